import sys

from phijax.recipe.run import main

sys.exit(main())
