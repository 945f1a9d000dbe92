"""Prompt pairs and the metrics measured on them.

Shape letters: P pairs, T positions, V vocabulary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch

from .errors import InputError
from .validate import check_finite_metric, check_known_tokens, check_single_token

# A user metric receives the last-position logits [B, V] and the answer/distractor token ids [B]
# (distractor may be None) and returns one value per prompt [B].
MetricFn = Callable[[torch.Tensor, torch.Tensor, Union[torch.Tensor, None]], torch.Tensor]

METRICS: tuple[str, ...] = ("logit_diff", "logprob")
DIRECTIONS: tuple[str, ...] = ("noising", "denoising")


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, distractor: torch.Tensor | None) -> torch.Tensor:
    """logit[answer] - logit[distractor] at the last position. logits: [B, V] -> [B]."""
    if distractor is None:
        raise InputError("metric 'logit_diff' needs distractor tokens; pass distractor=... or use metric='logprob'")
    return logits.gather(1, answer[:, None])[:, 0] - logits.gather(1, distractor[:, None])[:, 0]


def logprob(logits: torch.Tensor, answer: torch.Tensor, distractor: torch.Tensor | None) -> torch.Tensor:
    """log p(answer) at the last position. logits: [B, V] -> [B]."""
    return torch.log_softmax(logits, dim=-1).gather(1, answer[:, None])[:, 0]


_BUILTIN: dict[str, MetricFn] = {"logit_diff": logit_diff, "logprob": logprob}


def _as_tokens(name: str, value: Any, ndim: int) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value)
    except (ValueError, TypeError, RuntimeError) as err:
        raise InputError(
            f"{name} must be a rectangular array of integer token ids (every prompt the same length); got "
            f"{type(value).__name__} that torch cannot convert ({err})"
        ) from err
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise InputError(f"{name} must hold integer token ids; got dtype {tensor.dtype}")
    if tensor.ndim != ndim:
        want = "[n_pairs, seq]" if ndim == 2 else "[n_pairs]"
        raise InputError(f"{name} must have shape {want}; got shape {tuple(tensor.shape)}")
    return tensor.long()


class PromptPairs:
    """Clean/noise prompt pairs of equal token length, with the metric measured on them.

    Args:
        clean: [P, T] token ids of the prompts that show the behaviour.
        noise: [P, T] token ids of the prompts whose activations are patched in; same shape as clean.
        answer: [P] token id of the correct next token after each clean prompt.
        distractor: [P] token id of the competing token (needed by ``"logit_diff"``), or None.
        metric: ``"logit_diff"`` (answer minus distractor logit at the last position), ``"logprob"``
            (log-probability of the answer at the last position), or a callable
            ``f(logits [B, V], answer [B], distractor [B] | None) -> [B]`` on last-position logits.

    Raises:
        InputError: shapes differ, ids are not integers, or the metric is unknown.

    Example:
        >>> import atpstar
        >>> pairs = atpstar.PromptPairs(clean=[[1, 2, 3]], noise=[[1, 4, 3]], answer=[5], distractor=[6])
        >>> pairs
        PromptPairs(n_pairs=1, seq_len=3, metric='logit_diff')
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.PromptPairs.from_text(
        ...     model.tokenizer, clean=["When Mary and John went to the store, John gave a book to"],
        ...     noise=["When Lisa and Paul went to the store, Mark gave a book to"], answer=[" Mary"], distractor=[" John"])
        >>> pairs.n_pairs, pairs.seq_len, pairs.metric_name
        (1, 14, 'logit_diff')
    """

    def __init__(
        self,
        clean: Any,
        noise: Any,
        answer: Any,
        distractor: Any = None,
        metric: str | MetricFn = "logit_diff",
    ) -> None:
        self.clean = _as_tokens("clean", clean, 2)
        self.noise = _as_tokens("noise", noise, 2)
        if self.clean.shape != self.noise.shape:
            raise InputError(
                f"clean and noise prompts must have the same shape [n_pairs, seq]; got {tuple(self.clean.shape)} "
                f"and {tuple(self.noise.shape)}. Patching aligns positions, so each noise prompt needs exactly as "
                "many tokens as its clean prompt: pick noise prompts of equal token length."
            )
        if self.clean.shape[0] == 0 or self.clean.shape[1] == 0:
            raise InputError(f"prompt pairs are empty: shape {tuple(self.clean.shape)}")
        self.answer = _as_tokens("answer", answer, 1)
        self.distractor = None if distractor is None else _as_tokens("distractor", distractor, 1)
        for name, ids in (("answer", self.answer), ("distractor", self.distractor)):
            if ids is not None and ids.shape[0] != self.clean.shape[0]:
                raise InputError(f"{name} needs one token per pair ({self.clean.shape[0]}); got {ids.shape[0]}")
        check_answers_differ(self.answer, self.distractor)
        if isinstance(metric, str):
            if metric not in _BUILTIN:
                raise InputError(f"unknown metric {metric!r}; choose one of {list(METRICS)} or pass a callable")
            if metric == "logit_diff" and self.distractor is None:
                raise InputError("metric 'logit_diff' needs distractor tokens; pass distractor=... or metric='logprob'")
        elif not callable(metric):
            raise InputError(f"metric must be one of {list(METRICS)} or a callable; got {type(metric).__name__}")
        self.metric = metric

    @classmethod
    def from_text(
        cls,
        tokenizer: Any,
        clean: Sequence[str],
        noise: Sequence[str],
        answer: Sequence[str],
        distractor: Sequence[str] | None = None,
        metric: str | MetricFn = "logit_diff",
    ) -> PromptPairs:
        """Tokenize strings; every answer/distractor must be exactly one token, every pair equal length."""
        if not (len(clean) == len(noise) == len(answer)) or (distractor is not None and len(distractor) != len(clean)):
            raise InputError("clean, noise, answer (and distractor) need the same number of entries")
        clean_ids = [prompt_ids(tokenizer, text) for text in clean]
        noise_ids = [prompt_ids(tokenizer, text) for text in noise]
        for i, (c, n) in enumerate(zip(clean_ids, noise_ids)):
            check_known_tokens(tokenizer, c, clean[i], "clean prompt", f"pair {i}: ")
            check_known_tokens(tokenizer, n, noise[i], "noise prompt", f"pair {i}: ")
            if len(c) != len(n):
                raise InputError(
                    f"pair {i}: clean has {len(c)} tokens and noise has {len(n)}; they must be equal "
                    f"(clean={clean[i]!r}, noise={noise[i]!r})"
                )
            if len(c) != len(clean_ids[0]):
                raise InputError(
                    f"pair {i} has {len(c)} tokens but pair 0 has {len(clean_ids[0])}; all pairs in one PromptPairs "
                    "must have the same length (atpstar.PairSet.from_text takes prompts of unequal length)"
                )
        answer_ids = [single_token(tokenizer, a, "answer") for a in answer]
        distractor_ids = None if distractor is None else [single_token(tokenizer, d, "distractor") for d in distractor]
        return cls(clean_ids, noise_ids, answer_ids, distractor_ids, metric)

    @property
    def n_pairs(self) -> int:
        return int(self.clean.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean.shape[1])

    @property
    def metric_name(self) -> str:
        return self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "custom")

    def base_and_source(self, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(base run tokens, patch source tokens) for a direction: noising patches noise into clean."""
        check_direction(direction)
        return (self.clean, self.noise) if direction == "noising" else (self.noise, self.clean)

    def subset(self, index: Sequence[int] | torch.Tensor) -> PromptPairs:
        """The pairs at ``index``, same metric."""
        idx = torch.as_tensor(index, dtype=torch.long)
        distractor = None if self.distractor is None else self.distractor[idx]
        return PromptPairs(self.clean[idx], self.noise[idx], self.answer[idx], distractor, self.metric)

    @property
    def groups(self) -> tuple[PromptPairs, ...]:
        """The equal-length groups the verbs run one by one: rectangular pairs are one group (see ``PairSet``)."""
        return (self,)

    def gather(self, parts: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
        """Per-group results along the pair axis ``dim``, in pair order; one group: its result as it is."""
        if len(parts) != 1:
            raise InputError(f"rectangular prompt pairs are one group; got {len(parts)} parts")
        return parts[0]

    def answer_metric(self, model: Any, final: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
        """Metric [B] of the final hidden states ``final`` [B, T', D] of pairs ``pair_index`` [B].

        The one place the engines read the answer position: each prompt ends at the position that predicts
        its answer (``PairSet`` cuts prompts there), so the state read is the last one; ``model.unembed``
        turns it into logits [B, V].
        """
        return self.evaluate_metric(model.unembed(final[:, -1]), pair_index.to(final.device))

    def evaluate_metric(self, logits: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
        """Metric per row of last-position ``logits`` [B, V] for the pairs ``pair_index`` [B] -> [B]."""
        answer = self.answer.to(logits.device)[pair_index]
        distractor = None if self.distractor is None else self.distractor.to(logits.device)[pair_index]
        fn = _BUILTIN[self.metric] if isinstance(self.metric, str) else self.metric
        value = fn(logits, answer, distractor)
        if not isinstance(value, torch.Tensor) or value.shape != (logits.shape[0],):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(
                f"metric {self.metric_name!r} must return one scalar per prompt, a tensor of shape "
                f"[{logits.shape[0]}]; got {got}. Reduce over everything but the batch axis inside the metric."
            )
        if torch.is_grad_enabled() and logits.requires_grad and not value.requires_grad:
            raise InputError(
                f"metric {self.metric_name!r} has no gradient with respect to the logits (it detaches, rounds or "
                "indexes them); gradient methods need a differentiable metric, e.g. a logit or log-probability"
            )
        check_finite_metric(value.detach(), f"metric {self.metric_name!r}", pair_index)
        return value

    def fingerprint(self) -> str:
        """Short hash of the tokens and metric, to match checkpoints with the pairs they came from."""
        digest = hashlib.sha256()
        for tensor in (self.clean, self.noise, self.answer, self.distractor):
            if tensor is not None:
                digest.update(tensor.numpy().tobytes())
        digest.update(self.metric_name.encode())
        return digest.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"PromptPairs(n_pairs={self.n_pairs}, seq_len={self.seq_len}, metric={self.metric_name!r})"


def check_answers_differ(answer: Any, distractor: Any, names: Sequence[str] | None = None) -> None:
    """Refuse pairs whose distractor is their answer: the metric would be 0 for every run, so every effect is 0.

    Args:
        answer, distractor: [P] token ids (distractor None: nothing to check).
        names: how the message names pair i (default ``"pair i"``), e.g. ``"pairs.jsonl:3"``.
    """
    if distractor is None:
        return
    same = (torch.as_tensor(answer) == torch.as_tensor(distractor)).nonzero().flatten().tolist()
    if same:
        shown = ", ".join(f"{names[i] if names else f'pair {i}'} (token {int(answer[i])})" for i in same[:5])
        more = f" and {len(same) - 5} more" if len(same) > 5 else ""
        raise InputError(
            f"the answer and the distractor are the same token in {shown}{more}; the metric would not change under "
            "any patch (every effect 0). Give each pair a distractor that differs from its answer."
        )


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt, starting the way the tokenizer starts every text (Gemma's BOS, for one).

    Only special tokens the tokenizer puts *before* the text are kept (an appended EOS would end the
    prompt); tokenizers that add none (GPT-2, SmolLM2, the toy models) give the plain encoding.
    Gemma models need their BOS: without it gemma-3-270m gets IOI right on 16% of pairs instead of 100%.
    """
    plain = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.encode(text)
    if len(full) > len(plain) and full[len(full) - len(plain) :] == plain:
        return list(full[: len(full) - len(plain)]) + list(plain)
    return list(plain)


def single_token(tokenizer: Any, text: str, what: str) -> int:
    """The id of ``text`` if it is exactly one known token, else a clear error (see ``validate.check_single_token``)."""
    return check_single_token(tokenizer, text, what)


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise InputError(f"unknown direction {direction!r}; choose one of {list(DIRECTIONS)}")
    return direction
