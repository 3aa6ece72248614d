import sys

from phijax.serve.server import main

sys.exit(main())
