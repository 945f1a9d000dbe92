"""One family of errors for everything a user can cause.

The command line prints any of these as ``error: ...`` and exits with code 2.
"""


class AtpstarError(ValueError):
    """Base class: bad input or an unsupported model, with a message that says the fix."""


class UnsupportedModelError(AtpstarError):
    """The model's family or one of its attention features is not implemented."""


class InputError(AtpstarError):
    """Prompt pairs, metrics, node types, options, files or folders are malformed."""


class CorruptFileError(InputError):
    """A saved file is truncated, corrupt, of another kind or format version, or half of a pair."""


class IdentityMismatchError(InputError):
    """A saved result was made by another model, prompt set, direction, metric, node types or options."""


class BusyError(InputError):
    """Another process is working on the same output folder."""


class OutOfMemory(AtpstarError):
    """A batch of one element does not fit in the accelerator's memory (after halving on every OOM)."""
