"""Checks and token filters shared by the task generators."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import InputError


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """An integer of at least ``minimum``, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer; got {seed!r}")
    return seed


def is_single_token(tokenizer: Any, word: str) -> bool:
    """Whether ``" " + word`` (leading space, as it appears mid-sentence) is exactly one known token."""
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None)


def single_token_words(tokenizer: Any, words: Sequence[str], what: str, minimum: int) -> list[str]:
    """The words that are one token with a leading space; an error if fewer than ``minimum`` remain."""
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        raise InputError(f"a tokenizer with .encode is needed to build prompts; got {type(tokenizer).__name__}")
    kept = [word for word in words if is_single_token(tokenizer, word)]
    if len(kept) < minimum:
        raise InputError(
            f"only {len(kept)} of {len(words)} {what} are a single token (with a leading space) for this "
            f"tokenizer; at least {minimum} are needed. Pass a list of words this tokenizer keeps whole."
        )
    return kept
