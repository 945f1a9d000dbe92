"""Random pairs of natural prompts (the paper's RAND-PP family), sampled from the model itself.

Clean and noise are two independent samples from the model; the metric is the log-probability
(minus the next-token loss) of the clean sample's own next token.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from ..pairs import PromptPairs
from ._common import check_count, check_seed


def random_pairs(model: Any, n: int, seq_len: int, seed: int = 0, temperature: float = 1.0) -> PromptPairs:
    """Pairs of prompts sampled from ``model``, with the ``"logprob"`` metric.

    Sampling: every prompt starts with the tokenizer's BOS token (else its EOS token, the usual
    document separator), then ``seq_len - 1`` tokens are drawn one at a time from the model's
    next-token distribution at ``temperature``, never drawing special tokens. ``2 n`` prompts are
    drawn at once from a ``torch.Generator`` seeded with ``seed``; row ``i`` is the clean prompt
    and row ``n + i`` its noise prompt. One more token is drawn after each clean prompt: that is
    the answer (its log-probability is minus the clean next-token loss). Distractor: None.

    Args:
        model: an ``atpstar.Model`` with a tokenizer (e.g. from ``atpstar.load_model``).
        n: number of pairs.
        seq_len: tokens per prompt, BOS included (at least 2).
        seed: seed of the sampling generator; same model and arguments give the same pairs.
        temperature: softmax temperature of the sampling (> 0).

    Returns:
        ``PromptPairs`` of shape ``[n, seq_len]`` with metric ``"logprob"``.

    Raises:
        InputError: a bad count, length or temperature, or a model without a tokenizer or BOS/EOS token.
    """
    check_count("n", n)
    check_count("seq_len", seq_len, minimum=2)
    check_seed(seed)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise InputError(f"temperature must be a number > 0; got {temperature!r}")
    hf_model, tokenizer = _unwrap(model)
    start = _start_token(tokenizer)
    device = next(hf_model.parameters()).device
    banned = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.full((2 * n, 1), start, dtype=torch.long, device=device)  # [2n, 1]
    # seq_len - 1 tokens fill the prompts; one more is the clean prompts' answer.
    for _ in range(seq_len):
        tokens = torch.cat([tokens, _sample_next(hf_model, tokens, banned, temperature, generator)], dim=1)
    prompts = tokens[:, :seq_len].cpu()  # [2n, seq_len]
    answer = tokens[:n, seq_len].cpu()  # [n]
    return PromptPairs(prompts[:n], prompts[n:], answer, None, metric="logprob")


def _unwrap(model: Any) -> tuple[Any, Any]:
    hf_model = getattr(model, "hf_model", None)
    tokenizer = getattr(model, "tokenizer", None)
    if hf_model is None:
        raise InputError(f"random_pairs needs an atpstar.Model (use atpstar.load_model); got {type(model).__name__}")
    if tokenizer is None:
        raise InputError("random_pairs needs the model's tokenizer; pass it: atpstar.load_model(model, tokenizer=...)")
    return hf_model, tokenizer


def _start_token(tokenizer: Any) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        token = getattr(tokenizer, attr, None)
        if token is not None:
            return int(token)
    raise InputError("the tokenizer has neither a BOS nor an EOS token to start samples from; set tokenizer.bos_token")


@torch.inference_mode()
def _sample_next(
    hf_model: Any, tokens: torch.Tensor, banned: torch.Tensor, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """One sampled token per row: tokens [B, t] -> [B, 1]."""
    # No KV cache: prompts are short, and a full forward keeps sampling independent of cache quirks.
    logits = hf_model(tokens).logits[:, -1].float()  # [B, V]
    logits[:, banned] = float("-inf")
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
