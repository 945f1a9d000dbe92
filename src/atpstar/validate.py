"""Shared checks for user input: numbers, counts, memory budgets, tokens, lengths, finite values.

Every check raises ``InputError`` with a message that names the thing, what was wrong and what is
allowed, and returns the value (converted where that is safe), so callers write
``self.samples = check_count("samples", samples)``.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import warnings
from typing import Any

import torch

from .batching import plan_batch
from .errors import InputError

GIB = 2**30


def check_count(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer count in [minimum, maximum]; bools, floats with a fraction, NaN and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        else:
            raise InputError(f"{name} must be an integer >= {minimum}; got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise InputError(f"{name} must be an integer {allowed}; got {value}")
    return value


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in the interval [low, high] (ends open where asked); NaN and inf are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number; got {value!r}")
    value = float(value)
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number in {interval}; got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise InputError(f"{name} must be in {interval}; got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise InputError(f"{name} must be in {interval}; got {value}")
    return value


def check_memory_gb(value: Any) -> float:
    """A positive, finite memory budget in GiB."""
    return check_number("memory_gb", value, 0.0, None, low_open=True)


def check_batch_size(value: Any) -> int | None:
    """None (pick from ``memory_gb``) or an integer >= 1."""
    return None if value is None else check_count("batch_size", value)


def check_batching(batch_size: Any, memory_gb: Any) -> tuple[int | None, float]:
    """``(batch_size, memory_gb)`` checked and normalised (``4.0`` -> ``4``); store what it returns."""
    return check_batch_size(batch_size), check_memory_gb(memory_gb)


def batch_for_memory(batch_size: int | None, memory_gb: float, bytes_per_item: float) -> int:
    """``batching.plan_batch(bytes_per_item, memory_gb, batch_size=batch_size)`` (the one batching rule)."""
    return plan_batch(bytes_per_item, memory_gb, batch_size=batch_size)


def available_memory_bytes(device: torch.device | str | None = None) -> int | None:
    """Total memory of ``device`` (GPU memory for CUDA, physical RAM otherwise), or None if unknown."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def check_memory(needed_bytes: float, what: str, fix: str, device: torch.device | str | None = None) -> None:
    """Refuse a request whose predicted memory exceeds the device's total memory, before any work."""
    total = available_memory_bytes(device)
    if total is not None and needed_bytes > total:
        raise InputError(
            f"{what} needs about {needed_bytes / GIB:.1f} GiB, more than the {total / GIB:.1f} GiB this machine "
            f"has; {fix}"
        )


def check_single_token(tokenizer: Any, text: str, what: str, where: str = "") -> int:
    """The id of ``text`` if it is exactly one known token of ``tokenizer``, else a clear error.

    Args:
        where: prefix for the message, e.g. ``"pairs.jsonl:3: "``.
    """
    ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
    if len(ids) != 1:
        raise InputError(
            f"{where}{what} {text!r} is {len(ids)} tokens {ids}, but must be exactly one token for this tokenizer; "
            "choose a single-token word (mind the leading space, e.g. ' Paris')"
        )
    check_known_tokens(tokenizer, ids, text, what, where)
    return ids[0]


def check_known_tokens(tokenizer: Any, ids: list[int], text: str, what: str, where: str = "") -> None:
    """Refuse text that tokenized into the unknown token: the word is not in the vocabulary."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids and _unk_text(tokenizer) not in text:
        words = [w for w, piece in _words(text) if unk in tokenizer.encode(piece, add_special_tokens=False)]
        hint = f" (unknown: {words})" if words else ""
        raise InputError(
            f"{where}{what} {text!r} contains words outside the tokenizer's vocabulary{hint}; they would all become "
            "the unknown token. Use words the model knows."
        )


def _words(text: str) -> list[tuple[str, str]]:
    """(word, the word as it stands in ``text``): with the whitespace before it, none at the start.

    Tokenizers such as GPT-2's or a word-level one give ``"When"`` and ``" When"`` different tokens;
    a word is looked up as the prompt spells it, so a known first word is not reported as unknown.
    """
    return [(m.group(), text[max(m.start() - 1, 0) : m.end()]) for m in re.finditer(r"\S+", text)]


def _unk_text(tokenizer: Any) -> str:
    token = getattr(tokenizer, "unk_token", None)
    return str(token) if token else "\0"


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse token ids outside [0, vocab_size)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)].flatten()[:5].tolist()
        raise InputError(f"{name} token ids must lie in [0, {vocab_size}) (the model's vocabulary); got {bad}")


def check_length(seq_len: int, max_positions: int | None, what: str = "prompts") -> None:
    """Refuse prompts longer than the model's position limit."""
    if max_positions is not None and seq_len > max_positions:
        raise InputError(f"{what} have {seq_len} tokens; the model takes at most {max_positions} positions")


def check_finite_metric(values: torch.Tensor, what: str, pair_index: torch.Tensor | None = None) -> None:
    """Refuse a metric that is NaN or infinite on some prompt (``values`` [B]): the effects would be NaN.

    Args:
        pair_index: [B] the pair each value belongs to (for the message); None: position in ``values``.
    """
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        pairs = sorted(set((rows if pair_index is None else pair_index.cpu()[rows.cpu()]).tolist()))[:10]
        raise InputError(
            f"{what} is not finite (NaN or inf) on pair(s) {pairs}: values {values[bad][:5].tolist()}. "
            "Check the metric function and the answer/distractor tokens (and the dtype: fp16 overflows)."
        )


def warn_non_finite(tensors: dict[str, torch.Tensor], what: str) -> int:
    """Warn (once per call) when results hold NaN or inf; returns how many values are not finite."""
    values = [t.coalesce().values() if t.is_sparse else t for t in tensors.values()]  # top-k results are sparse
    # A finite sum proves every value finite (NaN and inf propagate) in one pass; count only otherwise.
    suspect = [v for v in values if v.is_floating_point() and not bool(torch.isfinite(v.sum()))]
    count = sum(int((~torch.isfinite(v)).sum()) for v in suspect)
    if count:
        warnings.warn(
            f"atpstar: {what} holds {count} NaN or infinite values (the metric overflowed or is undefined on some "
            "patched runs); those nodes rank as NaN",
            stacklevel=3,
        )
    return count


def check_device(device: str | torch.device) -> None:
    """Refuse a device string torch does not know, or a device this machine does not have."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise InputError(f"device {device!r} is not a torch device; use e.g. cpu, cuda, cuda:1, mps") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device}: no CUDA GPU is available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"device {device}: MPS is not available on this machine; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device {device}: atpstar runs on cpu, cuda or mps")


def check_finite_options(what: str, options: dict[str, Any]) -> None:
    """Refuse NaN and infinite numbers anywhere in ``options`` (nested lists and dicts included)."""
    for key, value in options.items():
        if _has_non_finite(value):
            raise InputError(f"{what}{key}={value!r}: options must be finite numbers (no NaN or inf)")


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    return False


def check_pairs_fit(model: Any, pairs: Any) -> None:
    """Refuse prompt pairs the model cannot run: training mode, prompt ids outside the vocabulary,
    prompts beyond the position limit, answer/distractor ids outside the output vocabulary (each group of a
    ``PairSet``)."""
    for group in pairs.groups:
        model.check_ready(torch.cat([group.clean, group.noise]))
    if all(torch.equal(group.clean, group.noise) for group in pairs.groups):
        raise InputError(
            "clean and noise prompts are identical in every pair: patching changes nothing and every effect is 0; "
            "give noise prompts that differ from the clean ones"
        )
    head = model.hf_model.get_output_embeddings()
    n_logits = getattr(head, "out_features", None) or getattr(model.hf_model.config, "vocab_size", None)
    if n_logits is not None:
        check_token_ids("answer", pairs.answer, int(n_logits))
        if pairs.distractor is not None:
            check_token_ids("distractor", pairs.distractor, int(n_logits))
