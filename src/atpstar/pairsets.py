"""``PairSet``: prompt pairs of unequal length, as equal-length groups that the verbs run one by one.

Each group is a rectangular ``PromptPairs``; the pair set keeps the examples' order, so per-pair
results of the groups are put back in it (``PairSet.gather``). Each prompt ends at the position that
predicts its answer (MIB's ``input_lengths - 1``), so every engine reads the metric at the last
position of its group (``PromptPairs.answer_metric``). Why groups and not padding with attention
masks: docs/design/0020-prompt-sets.md.

The verbs (``attribute``, ``verify``, ``false_negative_bound``, ``find``) run each group with the same
pass counter (``each_group``), so cost adds up, and merge what the groups return: node types whose
nodes are summed over positions (edges) concatenate on the pair axis; node types with a position axis
are refused when the groups differ in length (``check_positions``): position t means another token in
each group.

Shape letters: P pairs, T positions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import InputError
from .pairs import MetricFn, PromptPairs, check_answers_differ, prompt_ids
from .validate import check_known_tokens

R = TypeVar("R")


class PairSet(PromptPairs):
    """Clean/noise prompt pairs whose lengths differ from pair to pair, grouped by length.

    A ``PromptPairs`` to the verbs, which run its groups one by one; code that needs one rectangular
    tensor of tokens (``clean``, ``noise``, ``base_and_source``) is refused with a message that says so.

    Within a pair the clean and noise prompts have the same length (patching aligns positions). The
    metric is read at each prompt's last position; ``answer`` and ``distractor`` are one token per pair
    (for answers of several tokens, their first token: see ``from_text``).

    Args:
        groups: rectangular ``PromptPairs``, one per length, all with the same metric.
        order: [P] for each row of the groups stacked in order, the example it is (a permutation of
            0..P-1); None: the groups are already in example order.

    Raises:
        InputError: no groups, groups of different metrics, or an order that is not a permutation.

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> pairs = atpstar.PairSet.from_text(
        ...     model.tokenizer,
        ...     clean=["When Mary and John went to the store, John gave a drink to",
        ...            "Afterwards, Eric and Peter went to the house. Eric gave a ring to"],
        ...     noise=["When Mary and John went to the store, Paul gave a drink to",
        ...            "Afterwards, Eric and Peter went to the house. Mark gave a ring to"],
        ...     answer=[" Mary", " Peter"], distractor=[" John", " Eric"])
        >>> pairs, pairs.lengths.tolist(), len(pairs.groups)
        (PairSet(n_pairs=2, lengths=[14, 15], metric='logit_diff'), [14, 15], 2)
    """

    def __init__(self, groups: Sequence[PromptPairs], order: Sequence[int] | torch.Tensor | None = None) -> None:
        if not groups or not all(isinstance(g, PromptPairs) for g in groups):
            raise InputError("a PairSet needs at least one group of atpstar.PromptPairs")
        if len({g.metric_name for g in groups}) > 1 or len({id(g.metric) for g in groups if callable(g.metric)}) > 1:
            raise InputError("the groups of a PairSet must share one metric")
        self._groups = tuple(groups)
        self.info: dict[str, Any] = {}  # where the pairs came from (e.g. ``tasks.mib``); not part of the fingerprint
        n_pairs = sum(g.n_pairs for g in groups)
        self.order = torch.arange(n_pairs) if order is None else torch.as_tensor(order, dtype=torch.long)
        if self.order.shape != (n_pairs,) or not torch.equal(self.order.sort().values, torch.arange(n_pairs)):
            raise InputError(f"order must be a permutation of the {n_pairs} pairs; got {self.order.tolist()[:10]}...")

    @classmethod
    def from_ids(
        cls,
        clean: Sequence[Sequence[int]],
        noise: Sequence[Sequence[int]],
        answer: Sequence[int],
        distractor: Sequence[int] | None = None,
        metric: str | MetricFn = "logit_diff",
        answer_pos: Sequence[int] | None = None,
    ) -> PairSet:
        """Pairs from token ids of any lengths, grouped by length (groups ordered by length).

        Args:
            clean, noise: per pair, token ids; a pair's two prompts have the same length.
            answer, distractor: per pair, one token id each (distractor: None for ``metric="logprob"``).
            metric: as for ``PromptPairs``.
            answer_pos: per pair, the position whose next-token prediction the metric reads; None: the
                last. The prompts are cut after it: later tokens cannot change it in a causal model.

        Raises:
            InputError: counts differ, a pair's prompts differ in length, or an answer position is outside its prompt.
        """
        n = len(clean)
        if n == 0 or len(noise) != n or len(answer) != n or (distractor is not None and len(distractor) != n):
            raise InputError(f"clean, noise, answer (and distractor) need the same number of pairs (> 0); got {n}")
        ends = [_answer_end(i, clean[i], noise[i], None if answer_pos is None else answer_pos[i]) for i in range(n)]
        clean = [list(clean[i])[: ends[i]] for i in range(n)]
        noise = [list(noise[i])[: ends[i]] for i in range(n)]
        check_answers_differ(answer, distractor)
        groups, order = [], []
        for length in sorted(set(ends)):
            rows = [i for i in range(n) if ends[i] == length]
            pick = None if distractor is None else [distractor[i] for i in rows]
            group_clean, group_noise = [clean[i] for i in rows], [noise[i] for i in rows]
            groups.append(PromptPairs(group_clean, group_noise, [answer[i] for i in rows], pick, metric))
            order.extend(rows)
        return cls(groups, order)

    @classmethod
    def from_text(
        cls,
        tokenizer: Any,
        clean: Sequence[str],
        noise: Sequence[str],
        answer: Sequence[str],
        distractor: Sequence[str] | None = None,
        metric: str | MetricFn = "logit_diff",
        prepend_bos: bool | None = None,
    ) -> PairSet:
        """Tokenize prompts of any lengths; an answer or distractor of several tokens counts by its first token.

        The metric on an answer's first token is MIB's (``tokenizer(answer).input_ids[0]``): the logit
        difference of the first tokens of the answer and the distractor at the prompt's last position.

        Args:
            tokenizer: a Hugging Face tokenizer.
            clean, noise, answer, distractor, metric: as for ``PromptPairs.from_text`` (answers exactly as
                they continue the prompt, e.g. ``" Mary"`` with its leading space).
            prepend_bos: True: every prompt starts with the tokenizer's BOS (its EOS when it has none, as
                TransformerLens' ``prepend_bos``, which MIB uses); None: as the tokenizer starts texts.

        Raises:
            InputError: counts differ, unknown tokens, empty answers, or a pair's prompts of different lengths.
        """
        if not (len(clean) == len(noise) == len(answer)) or (distractor is not None and len(distractor) != len(clean)):
            raise InputError("clean, noise, answer (and distractor) need the same number of entries")
        clean_ids = [
            prompt_tokens(tokenizer, text, prepend_bos, f"pair {i}: ", "clean") for i, text in enumerate(clean)
        ]
        noise_ids = [
            prompt_tokens(tokenizer, text, prepend_bos, f"pair {i}: ", "noise") for i, text in enumerate(noise)
        ]
        answer_ids = [first_token(tokenizer, text, f"pair {i}: answer") for i, text in enumerate(answer)]
        distractor_ids = (
            None
            if distractor is None
            else [first_token(tokenizer, text, f"pair {i}: distractor") for i, text in enumerate(distractor)]
        )
        return cls.from_ids(clean_ids, noise_ids, answer_ids, distractor_ids, metric)

    @property
    def groups(self) -> tuple[PromptPairs, ...]:
        """The equal-length groups, shortest first."""
        return self._groups

    @property
    def n_pairs(self) -> int:
        return len(self.order)

    @property
    def seq_len(self) -> int:
        """The longest prompt (memory plans and position limits use it)."""
        return max(g.seq_len for g in self._groups)

    @property
    def lengths(self) -> torch.Tensor:
        """[P] token length of each pair, in example order."""
        return self.gather([torch.full((g.n_pairs,), g.seq_len, dtype=torch.long) for g in self._groups])

    @property
    def answer_positions(self) -> torch.Tensor:
        """[P] the position whose prediction the metric reads (the last), in example order."""
        return self.lengths - 1

    @property
    def metric(self) -> str | MetricFn:  # type: ignore[override]
        return self._groups[0].metric

    @property
    def metric_name(self) -> str:
        return self._groups[0].metric_name

    @property
    def answer(self) -> torch.Tensor:  # type: ignore[override]
        """[P] answer token ids in example order."""
        return self.gather([g.answer for g in self._groups])

    @property
    def distractor(self) -> torch.Tensor | None:  # type: ignore[override]
        """[P] distractor token ids in example order, or None."""
        if self._groups[0].distractor is None:
            return None
        return self.gather([g.distractor for g in self._groups if g.distractor is not None])

    def gather(self, parts: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
        """The groups' per-pair results (one tensor per group, pairs along ``dim``) as one, in example order."""
        if len(parts) != len(self._groups):
            raise InputError(f"gather needs one part per group ({len(self._groups)}); got {len(parts)}")
        stacked = torch.cat(list(parts), dim=dim)  # [..., P, ...] in group order
        out = torch.empty_like(stacked)
        index: list[Any] = [slice(None)] * stacked.ndim
        index[dim] = self.order.to(stacked.device)
        out[tuple(index)] = stacked  # out[..., order[i], ...] = stacked[..., i, ...]
        return out

    def subset(self, index: Sequence[int] | torch.Tensor) -> PromptPairs:
        """The pairs at ``index`` (example positions), same metric; one length left: a ``PromptPairs``."""
        wanted = torch.as_tensor(index, dtype=torch.long).tolist()
        place = {int(e): (g, r) for g, rows in enumerate(self._rows()) for r, e in enumerate(rows)}
        groups: list[PromptPairs] = []
        order: list[int] = []
        for g, group in enumerate(self._groups):
            picked = [(k, place[e][1]) for k, e in enumerate(wanted) if place[e][0] == g]
            if picked:
                groups.append(group.subset([r for _, r in picked]))
                order.extend(k for k, _ in picked)
        return as_pairs(PairSet(groups, order))

    def fingerprint(self) -> str:
        """Short hash of every group's tokens and metric and of the example order."""
        digest = hashlib.sha256()
        for group in self._groups:
            digest.update(group.fingerprint().encode())
        digest.update(self.order.numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def clean(self) -> torch.Tensor:  # type: ignore[override]
        raise _not_rectangular("clean")

    @property
    def noise(self) -> torch.Tensor:  # type: ignore[override]
        raise _not_rectangular("noise")

    def base_and_source(self, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise _not_rectangular("base_and_source")

    def evaluate_metric(self, logits: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
        raise _not_rectangular("evaluate_metric")

    def _rows(self) -> list[list[int]]:
        """For each group, the example position of each of its rows."""
        rows, start = [], 0
        for group in self._groups:
            rows.append(self.order[start : start + group.n_pairs].tolist())
            start += group.n_pairs
        return rows

    def __repr__(self) -> str:
        lengths = [g.seq_len for g in self._groups]
        return f"PairSet(n_pairs={self.n_pairs}, lengths={lengths}, metric={self.metric_name!r})"


def _not_rectangular(what: str) -> InputError:
    return InputError(
        f"{what}: a PairSet has prompts of several lengths, no single token tensor; run its groups (pairs.groups) "
        "one by one, or pass it to a verb (attribute, verify, false_negative_bound, find), which does"
    )


def as_pairs(pairs: Any) -> PromptPairs:
    """``pairs`` checked: a ``PromptPairs``, or a ``PairSet`` (one of a single length is its ``PromptPairs``).

    Raises:
        InputError: neither.
    """
    if isinstance(pairs, PairSet):
        return pairs.groups[0] if len(pairs.groups) == 1 else pairs
    if isinstance(pairs, PromptPairs):
        return pairs
    raise InputError(f"pairs must be an atpstar.PromptPairs or atpstar.PairSet; got {type(pairs).__name__}")


def check_positions(pairs: PromptPairs, position_axes: Mapping[str, int | None]) -> None:
    """Refuse node types with a position axis on pairs of several lengths (their results cannot be merged).

    Args:
        position_axes: node type -> its layout's position axis (None: summed over positions).
    """
    if len(pairs.groups) == 1:
        return
    positional = [t for t, axis in position_axes.items() if axis is not None]
    if positional:
        lengths = sorted({g.seq_len for g in pairs.groups})
        raise InputError(
            f"node types {positional} have a position axis, and these pairs have {len(lengths)} lengths "
            f"({lengths[:6]}): position t is another token in each length, so results cannot be merged. Ask for "
            "nodes summed over positions (edges), or run each group (pairs.groups) on its own"
        )


def each_group(job: Any, run: Callable[[Any], R]) -> list[R]:
    """``run(job)`` once per equal-length group of ``job.pairs``, on the same pass counter, in group order."""
    return [run(job.with_pairs(group)) for group in job.pairs.groups]


def refuse_workers(pairs: PromptPairs, workers: Any, ray_address: Any, checkpoint: Any = None) -> None:
    """``verify``, the bound and ``find`` run pairs of several lengths in-process: refuse
    ``workers=``/``ray_address=``/``checkpoint=`` there (``attribute`` sends them to workers in blocks of pairs)."""
    if len(pairs.groups) > 1 and (workers is not None or ray_address is not None or checkpoint is not None):
        raise InputError(
            "verify, false_negative_bound and find run pairs of several lengths (a PairSet) in-process only; drop "
            "workers=/ray_address=/checkpoint=, or run each group (pairs.groups) as its own call with them "
            "(attribute runs a PairSet on workers)"
        )


def merge_tensors(pairs: PromptPairs, parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-group dicts of per-pair tensors ([p, ...]) as one dict in example order."""
    return {key: pairs.gather([part[key] for part in parts]) for key in parts[0]}


def group_folder(folder: str | None, pairs: PromptPairs, group: PromptPairs) -> str | None:
    """A resumable folder (``checkpoint=``) of one group of pairs of several lengths: ``<folder>/length-<T>``,
    so each group's sweep resumes from its own units; one group, or no folder: ``folder``."""
    if folder is None or len(pairs.groups) == 1:
        return folder
    return str(Path(folder) / f"length-{group.seq_len}")


def merge_groups(pairs: PromptPairs, parts: Sequence[tuple[Any, Any, Any]]) -> tuple[Any, Any, Any]:
    """Per-group (per_pair, extras, info) as one, in example order; one group: its own."""
    if len(parts) == 1:
        return parts[0]
    tensors = merge_tensors(pairs, [p[0] for p in parts]), merge_tensors(pairs, [p[1] for p in parts])
    return (*tensors, merge_info(pairs, [p[2] for p in parts]))


def merge_info(pairs: PromptPairs, parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-group facts as one: equal facts kept, per-pair lists in example order, retries summed, others that
    differ listed per group (``{"per_group": [...]}``)."""
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [part[key] for part in parts if key in part]
        if len(values) == len(parts) and all(v == values[0] for v in values):
            merged[key] = values[0]
        elif len(values) == len(parts) and all(
            isinstance(v, list) and len(v) == g.n_pairs for v, g in zip(values, pairs.groups)
        ):
            merged[key] = pairs.gather([torch.as_tensor(v) for v in values]).tolist()
        elif key == "oom_retries":
            merged[key] = sum(values)
        else:
            merged[key] = {"per_group": values}
    return merged


def first_token(tokenizer: Any, text: str, what: str) -> int:
    """The first token id of ``text`` encoded alone (no special tokens), MIB's ``input_ids[0]``."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise InputError(f"{what} {text!r} encodes to no tokens; give a non-empty answer")
    check_known_tokens(tokenizer, ids[:1], text, what)
    return int(ids[0])


def prompt_tokens(tokenizer: Any, text: str, prepend_bos: bool | None, where: str = "", what: str = "") -> list[int]:
    """Token ids of a prompt as the tokenizer starts texts (``pairs.prompt_ids``), with BOS first if ``prepend_bos``."""
    ids = prompt_ids(tokenizer, text)
    check_known_tokens(tokenizer, ids, text, f"{what} prompt", where)
    if prepend_bos:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise InputError("prepend_bos=True, but the tokenizer has neither a BOS nor an EOS token")
        if not ids or ids[0] != bos:
            ids = [int(bos), *ids]
    return ids


def _answer_end(i: int, clean: Sequence[int], noise: Sequence[int], answer_pos: int | None) -> int:
    """The prompt length kept for pair ``i``: up to its answer position (the metric reads that position)."""
    if len(clean) != len(noise):
        raise InputError(
            f"pair {i}: clean has {len(clean)} tokens and noise has {len(noise)}; a pair's prompts must have the same "
            "length (patching aligns positions). Drop such pairs, as MIB's loaders do"
        )
    if answer_pos is None:
        return len(clean)
    if isinstance(answer_pos, bool) or not 0 <= int(answer_pos) < len(clean):
        raise InputError(f"pair {i}: answer_pos {answer_pos!r} is outside its prompt of {len(clean)} tokens")
    return int(answer_pos) + 1
