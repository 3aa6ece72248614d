"""Command-line conventions shared by every phijax and data_gen entry point: the exit codes."""

EXIT_BAD_INPUT = 2  # bad input, configuration or output directory: one error line says which
EXIT_INCOMPLETE = 3  # work left undone (budget stop, failed requests): rerun the same command to finish
EXIT_INTERRUPTED = 130  # Ctrl-C: rerun the same command to resume
