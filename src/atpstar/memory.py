"""Peak-memory prediction per method, from the model's sizes, the number of pairs and the prompt length.

A run holds the model's weights, a part that lives for the whole run (``fixed``: cached activations,
statistics, results kept in memory) and one batch of work (``per_item`` x ``batch``: the autograd graph
of a batch of pairs for gradient methods, a batch of patched forwards for exact ones). ``memory_gb``
bounds ``fixed + per_item x batch`` (the model's weights are not counted: they are the user's, and
offloaded ones are not resident); the batch is the largest that fits. Results kept on the CPU count
against the budget only when the model computes on the CPU (on a GPU they are host memory).

The per-token size of the autograd graph follows what autograd saves with frozen weights, checked
against measured peaks (``benchmarks/scaling.py`` prints predicted vs measured); it errs on the high side.

Shape letters: P pairs, L layers, T positions, H heads, K kv-heads, E d_head, D d_model, M d_mlp, V vocab.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

import torch

from .batching import HEADROOM, Footprint, plan_batch
from .engine import cache_bytes, site_elems
from .errors import InputError
from .gradients.consumers import plan_sites
from .gradients.points import AT_BASE, Points
from .model import Model
from .nodes import node_shape

GB = 2**30
F32, F64 = 4, 8


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted memory of one method run, in GiB.

    Attributes:
        method: the method id.
        device: where the working memory lives (the model's input device).
        weights_gb: the model's resident weights (parameters not offloaded to meta/disk).
        fixed_gb: held for the whole run (caches, statistics, results kept in memory on the compute device).
        per_item_gb: one batch element (a pair for gradient methods, a patched forward for exact ones).
        batch: elements per batch (``batch_size``, or the most that fit in ``memory_gb``).
        budget_gb: ``memory_gb``.
        host_results_gb: results kept in host memory while the model computes on an accelerator.
        pair_block: pairs whose cache is held at a time (exact patching streams over blocks of pairs);
            None where the method caches all pairs or none.

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> plan = atpstar.predict_memory(model, n_pairs=8, seq_len=15, method="activation_patching", nodes=["head"])
        >>> plan.method, plan.batch, plan.budget_gb
        ('activation_patching', 960, 1.0)
    """

    method: str
    device: str
    weights_gb: float
    fixed_gb: float
    per_item_gb: float
    batch: int
    budget_gb: float
    host_results_gb: float = 0.0
    pair_block: int | None = None

    @property
    def working_gb(self) -> float:
        """What ``memory_gb`` bounds: fixed + one batch."""
        return self.fixed_gb + self.per_item_gb * self.batch

    @property
    def peak_gb(self) -> float:
        """Predicted peak on the compute device: weights + fixed + one batch."""
        return self.weights_gb + self.working_gb

    def describe(self) -> str:
        host = f"; {self.host_results_gb:.2f} GB of results in host memory" if self.host_results_gb else ""
        block = "" if self.pair_block is None else f"; caches {self.pair_block} pairs at a time"
        return (
            f"{self.method}: predicted peak {self.peak_gb:.2f} GB on {self.device} = weights {self.weights_gb:.2f} "
            f"+ run {self.fixed_gb:.2f} + batch of {self.batch} x {self.per_item_gb * 1024:.1f} MB "
            f"(memory_gb={self.budget_gb:g}){host}{block}"
        )

    def to_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "working_gb": self.working_gb, "peak_gb": self.peak_gb}


def weights_bytes(model: Model) -> int:
    """Bytes of parameters and buffers that are resident (not on the meta device)."""
    tensors = [*model.hf_model.parameters(), *model.hf_model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta")


def _item(model: Model) -> int:
    return torch.finfo(model.dtype).bits // 8


def _vocab(model: Model) -> int:
    head = model.hf_model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or model.hf_model.config.vocab_size)


def layout_elems(model: Model, node_types: Iterable[str], seq_len: int) -> int:
    """Nodes per pair over the node types."""
    return sum(int(torch.Size(node_shape(t, model.sizes, seq_len)).numel()) for t in node_types)


def graph_bytes_per_pair(model: Model, seq_len: int) -> int:
    """Autograd graph of one pair's forward with parameters frozen (saved activations of every layer).

    With frozen weights a linear layer saves nothing, so per token and layer the graph holds the norms'
    inputs (2 D, float32 in half models: counted 4 D), queries and the keys/values expanded to every head
    (3 H E; QK-norms add up to H E, and unexpanded keys/values 2 K E), the attention pattern and pre-softmax
    scores (2 H T, float32 for half models) and the gated MLP's gate, activation and up projection (3 M).
    Measured on a random SmolLM2-135M-shaped Llama (float32, 4 pairs x 32 tokens): 7.75k floats per token
    and layer against 10.2k here (``benchmarks/scaling.py`` prints predicted vs measured peaks).
    """
    s = model.sizes
    item = _item(model)
    per_token = (4 * s.d_model + 4 * s.n_heads * s.d_head + 2 * s.n_kv_heads * s.d_head + 3 * s.d_mlp) * item
    per_token += 2 * s.n_heads * seq_len * max(item, F32)
    return s.n_layers * seq_len * per_token


def gradient_plan(
    model: Model,
    method: str,
    n_pairs: int,
    seq_len: int,
    node_types: list[str],
    *,
    qk_fix: bool,
    grad_drop: bool,
    keep: str,
    top_k: int,
    batch_size: int | None,
    memory_gb: float,
    points: Points = AT_BASE,
) -> MemoryPlan:
    """Memory of AtP, its fixes and AtP on a path (one gradient step per batch, ``gradients.gradient_step``).

    Per pair: one gradient run's graph; source - base at every layer's diff sites (the accumulation dtype);
    the QK fix's queries and keys of both runs; one layer's gradients and products at a time (they are
    consumed in the backward, ``gradients``), with the QK fix's [H, T, T] temporaries; on a path of m > 1
    points, the running sum of every grad site's gradient; per-layer estimates (GradDrop: the running sums)
    and their stack; GradDrop's residual-stream gradients; the logits. For the run: the dense per-pair
    results (twice while scores are aggregated) or, with keep='top'/'disk', the top-k entries and one
    float64 running sum per node.
    """
    s, item = model.sizes, _item(model)
    acc = max(item, F32)  # differences, products and estimates: float32 for half-precision models
    sites = plan_sites(node_types, qk_fix)  # the step's own choice of sites
    fix, diff_sites, grad_sites = sites.fix, sites.diff_sites, sites.grad_sites
    grad_elems = sum(site_elems(model, site, seq_len) for site in grad_sites)  # one layer's gradients
    diffs = s.n_layers * sum(site_elems(model, site, seq_len) for site in diff_sites) * acc
    raw = 2 * s.n_layers * sum(site_elems(model, site, seq_len) for site in ("q", "k")) * item if fix else 0
    one_layer = grad_elems * (item + acc)
    if fix:  # query_fix / key_fix hold a few [H, T, T] tensors of one layer
        one_layer += 8 * s.n_heads * seq_len * seq_len * acc
    path_sums = s.n_layers * grad_elems * acc if points.n > 1 else 0  # gradients summed over the points
    nodes = layout_elems(model, node_types, seq_len)
    estimates = 2 * nodes * acc  # per-layer estimates or GradDrop's running sums, and their stack
    resid = s.n_layers * seq_len * s.d_model * item if grad_drop else 0  # seeds of GradDrop's partial backwards
    logits = 3 * _vocab(model) * F32
    graph = graph_bytes_per_pair(model, seq_len)
    per_pair = graph + diffs + raw + one_layer + path_sums + estimates + resid + logits
    scores = 0 if keep == "all" else nodes * F64  # running sum of the aggregation (sink.PerPairSink)
    # Dense results, plus their absolute value while the scores are aggregated at the end; or top-k entries.
    results = n_pairs * (2 * nodes * acc if keep == "all" else len(node_types) * top_k * (acc + 8 * 4))
    return _plan(model, method, scores, results, per_pair, n_pairs, batch_size, memory_gb)


def patched_forward_bytes(model: Model, seq_len: int) -> int:
    """One patched forward (no graph): one layer's activations at a time plus the cached key/value prefix."""
    s, item = model.sizes, _item(model)
    per_layer = seq_len * (6 * s.d_model + 3 * s.d_mlp + 4 * s.n_heads * s.d_head) + 3 * s.n_heads * seq_len**2
    prefix = 2 * s.n_layers * s.n_kv_heads * seq_len * s.d_head
    return (per_layer + prefix) * item + 3 * _vocab(model) * F32


def patching_plan(
    model: Model,
    method: str,
    n_pairs: int,
    seq_len: int,
    node_types: list[str],
    *,
    n_items: int,
    run_bytes: int,
    item_extra: int,
    batch_size: int | None,
    memory_gb: float,
    results_bytes: int,
    pair_blocks: bool = False,
) -> MemoryPlan:
    """Memory of methods built on patched forwards (exact patching, subsampling, blocks).

    Args:
        n_items: patched forwards in the run (caps the batch).
        run_bytes: held for the run besides the cache (e.g. subsampling statistics).
        item_extra: bytes per patched forward besides its activations (masks).
        results_bytes: per-pair results kept in host memory.
        pair_blocks: the method caches a block of pairs at a time (``MemoryPlan.pair_block``): all pairs
            when their cache takes at most half of what ``memory_gb`` leaves after the results (or leaves
            room for ``batch_size``), else the most pairs whose cache fits in that half.
    """
    per_item = patched_forward_bytes(model, seq_len) + item_extra
    block = None
    if pair_blocks:
        block = _pair_block(model, method, n_pairs, seq_len, node_types, per_item, batch_size, memory_gb,
                            run_bytes + (results_bytes if model.device.type == "cpu" else 0))  # fmt: skip
    fixed = cache_bytes(model, block or n_pairs, seq_len, node_types) + run_bytes
    plan = _plan(model, method, fixed, results_bytes, per_item, n_items, batch_size, memory_gb)
    return plan if block is None else replace(plan, pair_block=block)


def _pair_block(
    model: Model,
    method: str,
    n_pairs: int,
    seq_len: int,
    node_types: list[str],
    per_item: int,
    batch_size: int | None,
    memory_gb: float,
    held: int,
) -> int:
    """Pairs per cache block: all when they fit next to a batch, else as many as half the room holds."""
    room = memory_gb * GB - held
    per_pair = cache_bytes(model, 1, seq_len, node_types)
    share = room - per_item * batch_size if batch_size is not None else room / 2
    if n_pairs * per_pair <= share:
        return n_pairs
    block = int(share // per_pair)
    if block < 1:
        raise InputError(
            f"{method}: memory_gb={memory_gb:g} is too small: the run holds {held / GB:.2f} GB (results), one "
            f"pair's cached activations need {per_pair / GB:.3f} GB and one patched forward {per_item / GB:.3f} GB. "
            "Raise memory_gb, use shorter prompts or patch fewer node types per call"
        )
    return block


def _plan(
    model: Model,
    method: str,
    fixed: int,
    results: int,
    per_item: int,
    n_items: int,
    batch_size: int | None,
    memory_gb: float,
) -> MemoryPlan:
    """Choose the batch: ``batch_size``, else the most items that fit in ``memory_gb`` next to ``fixed``."""
    on_cpu = model.device.type == "cpu"
    fixed_total = fixed + (results if on_cpu else 0)
    fix = "Raise memory_gb, use fewer pairs or shorter prompts" + (
        ", or keep='top' / keep='disk' to keep only top-k per pair" if "atp" in method else ""
    )
    footprint = Footprint(per_item, fixed + HEADROOM * memory_gb * GB, results)  # what no estimate counts
    batch = plan_batch(footprint, memory_gb, model.device, batch_size=batch_size, most=n_items, what=method, fix=fix)
    return MemoryPlan(
        method=method,
        device=str(model.device),
        weights_gb=weights_bytes(model) / GB,
        fixed_gb=fixed_total / GB,
        per_item_gb=per_item / GB,
        batch=batch,
        budget_gb=float(memory_gb),
        host_results_gb=0.0 if on_cpu else results / GB,
    )


def announce(plan: MemoryPlan, progress: bool) -> None:
    """Say the prediction where the progress bars go (stderr), when progress output is on."""
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(plan.describe(), file=sys.stderr)
