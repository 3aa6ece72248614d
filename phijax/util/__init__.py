"""The neutral layer under both phijax and data_gen: file and directory atomics, the cache root,
gin plumbing, command-line conventions. Imports neither jax nor tensorflow, and nothing else of
phijax or data_gen, so every other module may import it."""
