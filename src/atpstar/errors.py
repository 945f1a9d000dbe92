"""One family of errors for everything a user can cause.

The command line prints any of these as ``error: ...`` and exits with code 2.
"""


class AtpstarError(ValueError):
    """Base class: bad input or an unsupported model, with a message that says the fix.

    Example:
        >>> import atpstar
        >>> try:
        ...     atpstar.attribute(atpstar.load_model("toy-ioi"), None, method="atp-star", nodes=["head"])
        ... except atpstar.AtpstarError as error:
        ...     print(error)
        unknown method 'atp-star'; choose one of: activation_patching, atp, atp+qkfix, atp+graddrop, atp*, atp+ig, subsampling, blocks, hierarchical
    """


class UnsupportedModelError(AtpstarError):
    """The model's family or one of its attention features is not implemented.

    Example:
        >>> import atpstar, transformers
        >>> config = transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                                  intermediate_size=16)
        >>> try:
        ...     atpstar.load_model(transformers.BertForMaskedLM(config))
        ... except atpstar.UnsupportedModelError as error:
        ...     print(str(error).splitlines()[0])
        model type 'bert' is not supported; supported families (config.model_type):
    """


class InputError(AtpstarError):
    """Prompt pairs, metrics, node types, options, files or folders are malformed.

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 2, seed=0)
        >>> try:
        ...     atpstar.attribute(model, pairs, method="atp", nodes=["heads"])
        ... except atpstar.InputError as error:
        ...     print(error)
        unknown node type(s) ['heads']; choose from ['neuron', 'query', 'key', 'value', 'head', 'edge']
    """


class CorruptFileError(InputError):
    """A saved file is truncated, corrupt, of another kind or format version, or half of a pair.

    Example:
        >>> import atpstar, tempfile
        >>> from pathlib import Path
        >>> model = atpstar.load_model("toy-ioi")
        >>> result = atpstar.attribute(model, atpstar.tasks.ioi(model.tokenizer, 2, seed=0), "atp", nodes=["head"])
        >>> path = Path(tempfile.mkdtemp()) / "estimate"
        >>> result.save(path)
        >>> _ = (path.parent / "estimate.json").write_text("{")
        >>> try:
        ...     atpstar.Attribution.load(path)
        ... except atpstar.CorruptFileError as error:
        ...     print(type(error).__name__)
        CorruptFileError
    """


class IdentityMismatchError(InputError):
    """A saved result was made by another model, prompt set, direction, metric, node types or options.

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> estimate = atpstar.attribute(model, atpstar.tasks.ioi(model.tokenizer, 2, seed=0), "atp", nodes=["head"])
        >>> other_pairs = atpstar.tasks.ioi(model.tokenizer, 2, seed=1)
        >>> try:
        ...     atpstar.verify(model, other_pairs, estimate, budget=3)
        ... except atpstar.IdentityMismatchError as error:
        ...     print(str(error).split(":")[0])
        estimate (atp) does not match this run
    """


class BusyError(InputError):
    """Another process is working on the same output folder.

    Example:
        >>> import atpstar
        >>> issubclass(atpstar.BusyError, atpstar.InputError)
        True
    """


class OutOfMemory(AtpstarError):
    """A batch of one element does not fit in the accelerator's memory (after halving on every OOM).

    Example:
        >>> import atpstar
        >>> issubclass(atpstar.OutOfMemory, atpstar.AtpstarError)
        True
    """
