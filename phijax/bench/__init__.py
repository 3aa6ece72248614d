"""Benchmarks: scripts that print figures (docs/benchmarks.md)."""
from phijax.util.files import save_json  # noqa: F401  (every benchmark writes its figures through it)
