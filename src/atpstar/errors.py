"""One family of errors for everything a user can cause."""


class AtpstarError(ValueError):
    """Base class: bad input or an unsupported model, with a message that says the fix."""


class UnsupportedModelError(AtpstarError):
    """The model's family or one of its attention features is not implemented."""


class InputError(AtpstarError):
    """Prompt pairs, metrics, node types or options are malformed."""


class OutOfMemory(AtpstarError):
    """A batch of one element does not fit in the accelerator's memory (after halving on every OOM)."""
