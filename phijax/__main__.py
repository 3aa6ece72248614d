"""`python -m phijax <command> ...`: the `phijax` command (phijax/cli.py)."""
import sys

from phijax.cli import main

sys.exit(main())
