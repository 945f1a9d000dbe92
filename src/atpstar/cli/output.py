"""What a run leaves behind: the estimate and its CSV, plots, ``report.html`` and the printed top-nodes table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .common import say


def finish_run(
    args: argparse.Namespace,
    out: Path,
    model: Any,
    pairs: Any,
    task: str,
    estimate: Any,
    verified: Any,
    bound: Any,
    start: float,
    title: str,
    save_estimate: bool = True,
) -> None:
    """Save the estimate, CSV, plots and report; print the top-nodes table."""
    if save_estimate:
        estimate.save(out / "estimate")
        estimate.to_csv(out / "top_nodes.csv", k=min(1000, sum(s.numel() for s in estimate.scores.values())))
    images = []
    spaces = estimate.spaces()
    layered = [t for t in estimate.node_types if "layer" in spaces.of(t).axes(t)]  # edges have no layer map
    if not args.no_plots:
        from ..plots import plot_heatmaps, plot_verified

        if layered:
            images.append(
                (
                    f"{estimate.method} contributions",
                    plot_heatmaps(estimate, out / "heatmaps", node_types=layered, tokens=tokens(model, pairs))[0],
                )
            )
        if verified is not None and len(verified.nodes):
            images.append(
                (
                    "Verified exact effects",
                    plot_verified(verified.nodes, verified.effects, estimate, out / "verified", top=args.top)[0],
                )
            )
    from ..report import write_report

    facts = {
        f"wall time {estimate.method}": f"{estimate.info.get('wall_s', 0):.1f} s",
        "total wall time": f"{time.monotonic() - start:.1f} s",
    }
    write_report(
        out / "report.html",
        [estimate],
        title=title,
        task=task,
        facts=facts,
        verified=verified,
        bound=bound,
        images=images,
        top=args.top,
        prompts=prompts(model, pairs),
        tokens=tokens(model, pairs),
    )
    print_top(estimate, verified, args.top)
    written = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))  # not the lock
    say(f"wrote {out}/ ({', '.join(written)}) in {time.monotonic() - start:.1f} s")


def print_top(estimate: Any, verified: Any, top: int) -> None:
    """The estimate's top nodes on stdout, with their verified exact effect (mean over pairs) where known."""
    from ..report import verified_lookup

    lookup = verified_lookup(verified) if verified is not None else {}
    rows = estimate.top(top)
    width = max([len(r.name) for r in rows] + [4])
    header = f"{'rank':>4}  {'node':<{width}}  {'type':<6}  {estimate.method + ' score':>14}"
    print(header + (f"  {'exact effect':>12}" if lookup else ""))
    for rank, row in enumerate(rows, start=1):
        line = f"{rank:>4}  {row.name:<{width}}  {row.node_type:<6}  {row.score:>14.4g}"
        if lookup:
            effect = lookup.get((row.node_type, row.index))
            line += f"  {'-' if effect is None else format(float(effect.mean()), '.4g'):>12}"
        print(line)


def tokens(model: Any, pairs: Any) -> list[str] | None:
    """The first clean prompt, one string per token (heatmap labels), or None without a tokenizer."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return None
    return [tokenizer.decode([int(i)]) for i in pairs.clean[0]]


def prompts(model: Any, pairs: Any, count: int = 3) -> list[tuple[str, str]]:
    """Up to ``count`` (clean, noise) prompts as text for the report; none without a tokenizer."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return []
    return [
        (tokenizer.decode(pairs.clean[i].tolist()), tokenizer.decode(pairs.noise[i].tolist()))
        for i in range(min(count, pairs.n_pairs))
    ]
