"""The exceptions llmkit raises on bad input.

Each one names the input, what was wrong and what was expected; the CLI prints the message
without a traceback and exits non-zero.
"""


class LlmkitError(Exception):
    """Base class: an input that llmkit cannot use, explained in the message."""


class ConfigError(LlmkitError, ValueError):
    """A configuration value is missing, unknown or out of range; `param` names the field when one is
    to blame (the server reports it as OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class FormatError(LlmkitError, ValueError):
    """A file on disk is missing, truncated, or not in the layout expected."""


class DataError(LlmkitError, ValueError):
    """A corpus or data set is empty, malformed or inconsistent."""


class StorageError(LlmkitError, OSError):
    """A file could not be written (a full disk, a read-only folder); nothing half-written is left."""
