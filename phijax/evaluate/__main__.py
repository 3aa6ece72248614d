import sys

from phijax.evaluate.run import main

sys.exit(main())
