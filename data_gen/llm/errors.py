"""What stops a run before or while it sends: each message says what to fix (the CLIs print it
as one ``error:`` line and exit 2)."""


class EngineError(ValueError):
    """A configuration problem found before anything is sent; the message names it."""


class EndpointError(EngineError):
    """The endpoint refuses every request alike (wrong key, no permission, no such model) or
    cannot be reached at all: the run stops at once and records nothing against the samples."""


class OutputDirError(EngineError):
    """The output directory cannot be used: it is a file, cannot be created, does not exist
    (``--finalize_only``), or another run holds it."""
