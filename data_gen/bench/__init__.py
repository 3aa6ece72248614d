"""Benchmarks of the data_gen stages: scripts that print figures (docs/benchmarks.md); they write
them through ``phijax.util.files.save_json``."""
