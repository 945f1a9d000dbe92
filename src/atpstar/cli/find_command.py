"""``atpstar find``: the certified localization loop from the command line, with its certificate."""

from __future__ import annotations

import argparse
import csv
import json
import time
from typing import Any

from ..persist import atomic_path, write_text
from .args import command, outputs
from .common import load_model, load_task, out_dir, parse_nodes, plain, resumable, say


def add_find_parser(sub: Any) -> None:
    """The ``find`` subcommand's options (called by ``parser.build_parser``)."""
    find = command(
        sub,
        "find",
        "find every component with |effect| >= theta and certify that none is missing",
        "Estimate (AtP* by default), verify in estimate order, bound the unverified nodes by "
        "subsampling, verify what the bound cannot rule out, and repeat until certified or the budget is "
        "spent; when a further bound could push the cost past exhaustive patching plus --max-overspend, verify the "
        "rest exactly instead. Writes localization.json/.safetensors, found.csv, history.csv, certificate.json and "
        "report.html; prints the components found next to the certificate. Each completed step is "
        "checkpointed to OUT/find.ckpt.safetensors: an interrupted run resumes when rerun with the same --out.",
    )
    find.add_argument("--theta", type=float, required=True, help="effect size sought, in metric units (e.g. 0.3)")
    find.add_argument(
        "--nodes", default="attention", help="node types: all, attention, qkv, or a comma list (default attention)"
    )
    find.add_argument("--estimator", default="atp*", help="method that ranks the nodes first (default atp*)")
    find.add_argument("--alpha", type=float, default=0.05, help="error rate of the certificate (default 0.05)")
    find.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="FE",
        help="hard cap on the total cost in forward-pass equivalents; a run it cuts short ends not certified "
        "(default: none, run until certified)",
    )
    find.add_argument(
        "--max-overspend",
        type=float,
        default=0.1,
        metavar="FRACTION",
        help="how much a failed bound may cost beyond exhaustive patching, as a fraction of it (default 0.1): a bound "
        "runs only while, should it fail, verifying every node left stays within the estimate + (1 + FRACTION) x "
        "exhaustive patching; else the rest is verified exactly (certified by exhaustion)",
    )
    find.add_argument("--max-rounds", type=int, default=6, help="bound rounds at most (default 6)")
    find.add_argument("--bound-seed", type=int, default=0, help="subsampling seed of the bounds (default 0)")
    find.add_argument(
        "--recompute",
        action="store_true",
        help="discard the checkpoint OUT/find.ckpt.safetensors (also another run's) and start afresh",
    )
    outputs(find, "out/find", plots=False)


def cmd_find(args: argparse.Namespace) -> int:
    from ..find import find
    from ..find.journal import CHECKPOINT_NAME
    from ..report import write_report

    start = time.monotonic()
    nodes = parse_nodes(args.nodes)
    out = out_dir(args)
    model = load_model(args)
    pairs, task = load_task(model, args)
    say(f"find: |c| >= {args.theta:g} among {','.join(nodes)} on {pairs.n_pairs} pairs, alpha {args.alpha:g}")
    checkpoint = resumable(out / CHECKPOINT_NAME)
    if args.recompute and checkpoint.exists():
        say(f"--recompute: discarding {checkpoint}")
    elif checkpoint.exists():
        say(f"resuming from {checkpoint}: completed steps are not redone (--recompute starts afresh)")
    found = find(
        model,
        pairs,
        args.theta,
        nodes=nodes,
        estimator=args.estimator,
        alpha=args.alpha,
        budget=args.budget,
        max_overspend=args.max_overspend,
        direction=args.direction,
        progress=not args.no_progress,
        max_rounds=args.max_rounds,
        seed=args.bound_seed,
        workers=args.workers,
        ray_address=args.ray_address,
        checkpoint=checkpoint,
        recompute=args.recompute,
    )
    resumed = found.info.get("resumed")
    if resumed:
        say(
            f"resumed {resumed['steps']} completed steps ({resumed['cost_fe']:.0f} forward equivalents) from {checkpoint}"
        )
    found.info["pairs_fingerprint"] = pairs.fingerprint()
    found.save(out / "localization")
    certificate = found.certificate()
    write_text(out / "certificate.json", json.dumps(plain(certificate), indent=2))
    _write_csv(out / "found.csv", found.to_rows())
    _write_csv(out / "history.csv", found.history)
    _print(found, certificate, args.top)
    facts = _certificate_facts(found, certificate)
    facts["wall time"] = f"{time.monotonic() - start:.1f} s"
    path = write_report(
        out / "report.html",
        [],
        title=f"atpstar find: |c| >= {args.theta:g}",
        task=task,
        facts={"model": model.model_id, "task": task, **facts},
        verified=found.verified,
        bound=found.bound,
        top=max(args.top, len(found.nodes)),
    )
    say(f"wrote {out / 'localization.json'}, {out / 'certificate.json'} and {path}")
    return 0


def _certificate_facts(found: Any, certificate: dict[str, Any]) -> dict[str, str]:
    bound = certificate["final_bound"] or {}
    by_stage = ", ".join(f"{stage} {cost:.0f}" for stage, cost in certificate["cost_by_stage"].items())
    facts = {
        "certificate": certificate["statement"],
        "certified": f"yes, by {found.certified_by}" if found.certified else "no",
        "theta": f"{found.theta:g}",
        "alpha": f"{found.alpha:g} (round r of the bound uses alpha / 2^r)",
        "assumption": certificate["assumption"],
        "rounds": str(certificate["rounds"]),
        "cost": f"{certificate['cost_forward_equivalents']:.0f} forward equivalents = "
        f"{certificate['cost_fraction_of_exhaustive']:.1%} of exhaustive patching ({by_stage})",
        "components found": f"{len(found.nodes)} with |c| >= {found.theta:g} ({found.verified.n_verified} verified)",
    }
    if bound:
        facts["final bound"] = (
            f"max |c| of {bound['n_unverified']} unverified <= {bound['max_effect_upper']:.4g}; "
            f"P(some |c| >= theta) <= {bound['prob_upper']:.3g} (samples {bound['samples']}, p {bound['p']})"
        )
    if not found.certified:
        facts["left"] = json.dumps(plain(certificate["left"]))
    return facts


def _print(found: Any, certificate: dict[str, Any], top: int) -> None:
    print(f"\n## components with |c| >= {found.theta:g} ({len(found.nodes)})\n")
    print("| rank | node | effect |\n|---|---|---|")
    for row in found.to_rows()[: max(top, len(found.nodes))]:
        print(f"| {row['rank']} | {row['name']} | {row['effect']:+.4g} |")
    print("\n## certificate\n")
    for key, value in _certificate_facts(found, certificate).items():
        print(f"- {key}: {value}")


def _write_csv(path: Any, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
