"""Plots: cost of verified recall, estimate against true effect, contribution heatmaps.

Every function takes result objects and an output path stem and writes ``stem.png`` and ``stem.svg``,
returning both paths. matplotlib is an optional dependency (``pip install atpstar[plots]``), imported
only inside these functions, with the Agg backend (no display needed).

Shape letters: P pairs, L layers, H heads, T positions, M d_mlp.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import AtpstarError, InputError
from .evaluate.record import Evaluation
from .result import Attribution
from .spaces import check_node_types

MAX_POINTS = 6000  # per scatter panel: all the largest true effects, a random sample of the rest


def require_matplotlib(alternative: str = "") -> None:
    """Refuse to go on without matplotlib, naming the fix (and ``alternative``, e.g. ``"--no-plots"``).

    Raises:
        AtpstarError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        other = f", or pass {alternative}" if alternative else ""
        raise AtpstarError(
            f"plots need matplotlib, which is not installed; install it with: pip install matplotlib "
            f"(or pip install 'atpstar[plots]'){other}"
        ) from err


def _pyplot() -> Any:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, stem: str | Path) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")]
    from .persist import atomic_path

    for path, dpi in zip(paths, (130, None)):  # via a temporary file: an interrupted save leaves no torn image
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix[1:], dpi=dpi or "figure", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def plot_cost_curves(evaluation: Evaluation, stem: str | Path, title: str | None = None) -> list[Path]:
    """Cost of verified recall against K, log-log, one curve per method, with the oracle (verifying exactly the true top-K).

    In the per-pair setting the curve is the geometric mean over pairs and the band spans the
    quartiles over pairs (a lighter band spans min to max when at most three methods are shown).

    Args:
        evaluation: from ``atpstar.evaluate.evaluate``.
        stem: output path without extension.
        title: figure title (default: model, setting, node types).

    Returns:
        [stem.png, stem.svg]
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    k = evaluation.k
    per = "K x P" if evaluation.setting == "distribution" and evaluation.verification == "forward" else "K"
    oracle_label = f"oracle (cost = {per})" if evaluation.verification == "forward" else "oracle (true top-K)"
    ax.plot(k, evaluation.oracle_cost(), color="black", linestyle="--", linewidth=1, label=oracle_label)
    for i, method in enumerate(evaluation.ranking()):
        curve = evaluation.curves[method]
        color = f"C{i % 10}"
        label = f"{method} (own {curve.own_cost:.3g})"
        ax.plot(k, curve.cost, color=color, linewidth=1.8, label=label, drawstyle="steps-post")
        if curve.cost_q25 is not None and curve.cost_q75 is not None and evaluation.n_pairs > 1:
            ax.fill_between(k, curve.cost_q25, curve.cost_q75, color=color, alpha=0.18, step="post", linewidth=0)
        # The min..max band only while it stays legible.
        if (
            curve.cost_min is not None
            and curve.cost_max is not None
            and evaluation.n_pairs > 1
            and len(evaluation.curves) <= 3
        ):
            ax.fill_between(k, curve.cost_min, curve.cost_max, color=color, alpha=0.07, step="post", linewidth=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (true top-K nodes verified)")
    what = "geometric mean over pairs" if evaluation.setting == "per_pair" else "distribution"
    ax.set_ylabel(f"cost of verified recall\n(forward-pass equivalents, {what})")
    ax.set_title(
        title or f"{evaluation.model_id}: {', '.join(evaluation.node_types)} ({evaluation.setting})", fontsize=10
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return _save(fig, stem)


def plot_estimate_vs_truth(
    truth: Attribution,
    estimates: Sequence[Attribution],
    stem: str | Path,
    node_types: Sequence[str] | None = None,
    per_pair: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Scatter of |estimate| against |true effect|, one panel per node type (rows) and method (columns).

    Points far below the diagonal on the right are false negatives (e.g. plain AtP on query and key
    nodes under attention saturation). Axes are log-scaled; exact zeros sit on the lower edge.

    Args:
        truth: exact effects (``activation_patching``).
        estimates: estimates on the same nodes (e.g. ``atp`` and ``atp*``).
        stem: output path without extension.
        node_types: which node types (default: those of the truth present in every estimate).
        per_pair: plot every (pair, node) value; False plots the aggregate ``scores``.
        seed: seed of the subsample of small effects drawn when a panel has too many points.

    Returns:
        [stem.png, stem.svg]
    """
    if not estimates:
        raise InputError("plot_estimate_vs_truth needs at least one estimate")
    types = (
        check_node_types(list(node_types))
        if node_types is not None
        else [t for t in truth.node_types if all(t in e.scores for e in estimates)]
    )
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(types), len(estimates), figsize=(3.2 * len(estimates) + 0.6, 2.9 * len(types)), squeeze=False
    )
    gen = np.random.default_rng(seed)
    for row, node_type in enumerate(types):
        x_all = (truth.per_pair[node_type] if per_pair else truth.scores[node_type]).abs().flatten().double().numpy()
        keep = _subsample(x_all, gen)
        x = x_all[keep]
        for col, estimate in enumerate(estimates):
            values = estimate.per_pair[node_type] if per_pair else estimate.scores[node_type]
            y = values.abs().flatten().double().numpy()[keep]
            _scatter_panel(axes[row][col], x, y, col, f"{estimate.method}: {node_type}")
            if row == len(types) - 1:
                axes[row][col].set_xlabel("|true effect|", fontsize=8)
            if col == 0:
                axes[row][col].set_ylabel("|estimate|", fontsize=8)
    fig.suptitle(
        f"estimate vs exact effect ({'per pair' if per_pair else 'aggregate'}, {truth.direction})", fontsize=10
    )
    fig.tight_layout()
    return _save(fig, stem)


def _scatter_panel(ax: Any, x: np.ndarray, y: np.ndarray, color: int, title: str) -> None:
    """One panel: |estimate| ``y`` against |true effect| ``x`` (both [n]) on log axes, the diagonal dashed."""
    top = float(max(x.max(initial=0.0), y.max(initial=0.0), 1e-30)) * 1.5
    positive = np.concatenate([x[x > 0], y[y > 0]])
    # Values more than 1e7 below the largest are float noise; they and exact zeros sit on the floor.
    floor = max(float(positive.min()) / 2 if positive.size else top * 1e-7, top * 1e-7)
    low = y <= floor
    ax.scatter(np.maximum(x[~low], floor), y[~low], s=4, alpha=0.4, color=f"C{color}", linewidths=0)
    if low.any():
        lows = (np.maximum(x[low], floor), np.full(int(low.sum()), floor))
        label = f"|estimate| ≈ 0 ({int(low.sum())})"
        ax.scatter(*lows, s=10, marker="v", color="C3", alpha=0.5, linewidths=0, label=label)
        ax.legend(fontsize=6, loc="upper left")
    ax.plot([floor, top], [floor, top], color="black", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, top)
    ax.set_ylim(floor, top)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


def _subsample(values: np.ndarray, gen: np.random.Generator) -> np.ndarray:
    """Indices: every value when few, else the largest MAX_POINTS/2 and a random MAX_POINTS/2 of the rest."""
    if values.size <= MAX_POINTS:
        return np.arange(values.size)
    order = np.argsort(-values, kind="stable")
    head, rest = order[: MAX_POINTS // 2], order[MAX_POINTS // 2 :]
    return np.concatenate([head, gen.choice(rest, MAX_POINTS // 2, replace=False)])


def contribution_maps(attribution: Attribution, node_type: str) -> dict[str, np.ndarray]:
    """Summed |scores| of one node type: ``"layer x pos"`` [L, T] and, for attention types, ``"layer x head"`` [L, H]."""
    scores = attribution.scores[node_type].abs().double()  # [L, T, M] or [L, H|K, T]
    axes = attribution.spaces().of(node_type).axes(node_type)  # e.g. ("layer", "head", "pos")
    if "layer" not in axes:  # nodes of one layer (a dictionary's latents [S, T], its error [T]): one row
        other = tuple(i for i, axis in enumerate(axes) if axis != "pos")
        return {"layer x pos": (scores.sum(other) if other else scores)[None].numpy()}  # [S, T] -> [1, T]
    unit_axis = next(i for i, axis in enumerate(axes) if axis not in ("layer", "pos"))
    maps = {}
    if axes[unit_axis] != "index":  # named units (heads) make a map; plain indices (neurons) are too many
        maps[f"layer x {axes[unit_axis]}"] = scores.sum(axes.index("pos")).numpy()  # [L, H, T] -> [L, H]
    maps["layer x pos"] = scores.sum(unit_axis).numpy()  # [L, H, T] or [L, T, M] -> [L, T]
    return maps


def plot_heatmaps(
    attribution: Attribution,
    stem: str | Path,
    node_types: Sequence[str] | None = None,
    tokens: Sequence[str] | None = None,
) -> list[Path]:
    """Contribution heatmaps, one row per node type: layer × position and layer × head (|scores| summed).

    Args:
        attribution: any result.
        stem: output path without extension.
        node_types: which node types (default: all in the result).
        tokens: labels for the positions (e.g. the first clean prompt's tokens).

    Returns:
        [stem.png, stem.svg]
    """
    types = check_node_types(list(node_types)) if node_types is not None else attribution.node_types
    plt = _pyplot()
    n_layers = attribution.scores[types[0]].shape[0]
    height = max(2.4, 0.09 * n_layers + 1.6)
    fig, axes = plt.subplots(
        len(types), 2, figsize=(12, height * len(types)), squeeze=False, gridspec_kw={"width_ratios": [3, 1]}
    )
    for row, node_type in enumerate(types):
        maps = contribution_maps(attribution, node_type)
        for col, name in enumerate(("layer x pos", "layer x head")):
            ax = axes[row][col]
            if name not in maps:
                ax.axis("off")
                continue
            values = maps[name]
            image = ax.imshow(values, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest")
            fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=7)
            ax.set_title(f"{node_type}: Σ|score| by {name}", fontsize=9)
            ax.set_ylabel("layer", fontsize=8)
            ax.set_yticks(_int_ticks(values.shape[0]))
            axis_name = name.split(" x ")[1]
            ax.set_xlabel("position" if axis_name == "pos" else "head", fontsize=8)
            if axis_name == "pos" and tokens is not None and len(tokens) == values.shape[1]:
                ax.set_xticks(range(len(tokens)))
                ax.set_xticklabels([repr(tok)[1:-1] for tok in tokens], rotation=70, fontsize=6)
            else:
                ax.set_xticks(_int_ticks(values.shape[1]))
            ax.tick_params(labelsize=7)
    fig.suptitle(f"{attribution.method} contributions ({attribution.direction}, {attribution.metric})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return _save(fig, stem)


def _int_ticks(size: int, most: int = 16) -> list[int]:
    step = max(1, -(-size // most))
    return list(range(0, size, step))


def plot_verified(
    nodes: Sequence[tuple[str, tuple[int, ...]]],
    effects: torch.Tensor,
    estimate: Attribution,
    stem: str | Path,
    names: Sequence[str] | None = None,
    top: int = 30,
) -> list[Path]:
    """Bar chart of verified exact effects (mean over pairs, with min/max whiskers) for the first ``top`` nodes.

    Args:
        nodes: verified nodes (node type, index) in verification order.
        effects: [n_verified, P] exact signed effects.
        estimate: the estimate the nodes were ranked by (its score is shown next to each bar).
        stem: output path without extension.
        names: labels (default: the names the estimate's node spaces give, TransformerLens-style for sites).
        top: how many nodes to show.

    Returns:
        [stem.png, stem.svg]
    """
    plt = _pyplot()
    count = min(top, len(nodes))
    effects = torch.as_tensor(effects).double()[:count]
    spaces = estimate.spaces()
    labels = list(names[:count]) if names is not None else [spaces.name(t, tuple(i)) for t, i in nodes[:count]]
    mean = effects.mean(1).numpy()
    low, high = effects.min(1).values.numpy(), effects.max(1).values.numpy()
    fig, ax = plt.subplots(figsize=(7.5, 0.28 * count + 1.2))
    y = np.arange(count)[::-1]
    ax.barh(y, mean, color=["C3" if m < 0 else "C0" for m in mean], alpha=0.8)
    if effects.shape[1] > 1:
        ax.errorbar(mean, y, xerr=[mean - low, high - mean], fmt="none", ecolor="black", elinewidth=0.7, capsize=2)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(f"exact effect on {estimate.metric} (mean over pairs; whiskers min..max)", fontsize=8)
    ax.set_title(f"top {count} nodes by {estimate.method}, verified by activation patching", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return _save(fig, stem)


__all__ = ["contribution_maps", "plot_cost_curves", "plot_estimate_vs_truth", "plot_heatmaps", "plot_verified"]
