"""The dictionaries a process knows by name: attached ones (with weights) and ones described by saved results.

A dictionary's latents are the node type ``name`` and its error the node type ``name + ".error"``; the
latent node space (``atpstar.spaces.LatentNodes``) owns exactly the names known here. ``attach`` is what
``attribute(..., dictionaries=[...])`` and the CLI's ``--dictionary`` call; attaching another dictionary
under a name replaces it (fingerprints carry each dictionary's content hash, so results never mix).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import InputError
from .dictionary import Dictionary

ERROR_SUFFIX = ".error"

ATTACHED: dict[str, Dictionary] = {}
DESCRIBED: dict[str, dict[str, Any]] = {}  # name -> ``Dictionary.describe()`` of dictionaries seen in results


def node_types_of(dictionary: Dictionary) -> list[str]:
    """The node types of one dictionary: its latents, then its error."""
    return [dictionary.name, dictionary.name + ERROR_SUFFIX]


def attach(dictionaries: Iterable[Dictionary]) -> list[str]:
    """Make dictionaries known by name (the latent space binds them); returns their node types."""
    types: list[str] = []
    for dictionary in dictionaries:
        if not isinstance(dictionary, Dictionary):
            raise InputError(
                f"dictionaries must be atpstar.load_dictionary(...) results; got {type(dictionary).__name__}"
            )
        ATTACHED[dictionary.name] = dictionary
        DESCRIBED[dictionary.name] = dictionary.describe()
        types += node_types_of(dictionary)
    return types


def detach(names: Iterable[str]) -> None:
    """Forget attached dictionaries (tests)."""
    for name in names:
        ATTACHED.pop(name, None)
        DESCRIBED.pop(name, None)


def dictionary_name(node_type: str) -> str | None:
    """The known dictionary a node type belongs to (latents or error), or None."""
    name = node_type[: -len(ERROR_SUFFIX)] if node_type.endswith(ERROR_SUFFIX) else node_type
    return name if name in DESCRIBED else None


def is_error(node_type: str) -> bool:
    return node_type.endswith(ERROR_SUFFIX) and dictionary_name(node_type) is not None


def attached(name: str) -> Dictionary:
    """The attached dictionary ``name``; a name known only from a saved result needs its weights attached."""
    if name not in ATTACHED:
        raise InputError(
            f"dictionary {name!r} is not loaded in this process; pass dictionaries=[atpstar.load_dictionary(...)] "
            "(CLI: --dictionary PATH) with the dictionary the result was made with"
        )
    return ATTACHED[name]


def learn(descriptions: Mapping[str, Mapping[str, Any]]) -> None:
    """Make names of a saved result's dictionaries known (their weights are not needed to name nodes)."""
    for name, description in descriptions.items():
        DESCRIBED.setdefault(name, dict(description))


def identity_of(node_types: Sequence[str]) -> dict[str, str]:
    """The fingerprint field of the dictionaries among ``node_types``: ``name=content hash``, in order (or nothing)."""
    names = list(dict.fromkeys(n for n in map(dictionary_name, node_types) if n is not None))
    if not names:
        return {}
    return {"dictionaries": ",".join(f"{n}={DESCRIBED[n].get('content_hash', '')}" for n in names)}
