"""Helpers for the task tests: a word-level tokenizer and metrics measured with the model's own forward."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

PIECE = r" ?[A-Za-z]+|[^\sA-Za-z]"


def word_tokenizer(texts: Sequence[str]) -> Any:
    """A word-level tokenizer whose tokens carry their leading space, covering every piece of ``texts``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = sorted({piece for text in texts for piece in re.findall(PIECE, text)})
    vocab = {token: i for i, token in enumerate(["<unk>", "<bos>"] + pieces)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>")


@torch.no_grad()
def clean_metric(model: Any, pairs: Any) -> torch.Tensor:
    """The metric on the clean prompts with the model's own forward: [P]."""
    logits = model.hf_model(pairs.clean.to(model.device)).logits[:, -1].float()
    return pairs.evaluate_metric(logits, torch.arange(pairs.n_pairs))


@torch.no_grad()
def noise_metric(model: Any, pairs: Any) -> torch.Tensor:
    """The clean pairs' metric measured on the noise prompts: [P]."""
    logits = model.hf_model(pairs.noise.to(model.device)).logits[:, -1].float()
    return pairs.evaluate_metric(logits, torch.arange(pairs.n_pairs))
