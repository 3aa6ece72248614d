"""`python -m phijax.vocab train ...`: the short name of `python -m phijax.data.vocab` (same CLI)."""
from phijax.data.vocab import _main

if __name__ == "__main__":
    _main()
