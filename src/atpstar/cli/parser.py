"""The argparse options of every ``atpstar`` command (no work is done here).

One function per command adds its sub-parser; the options several commands share come from ``args``,
and ``find`` and ``circuit`` add their own (``find_command``, ``circuit``).
"""

from __future__ import annotations

import argparse
from typing import Any

from .args import command, outputs
from .circuit import add_circuit_parser
from .find_command import add_find_parser
from .mib_command import add_mib_parser

COMPARE_DEFAULT = "atp,atp+qkfix,atp*,subsampling,blocks,hierarchical"
Subparsers = Any  # argparse's private _SubParsersAction


def build_parser() -> argparse.ArgumentParser:
    """The ``atpstar`` parser: one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="atpstar",
        description="Find the components of a transformer LM that cause a behaviour: exact activation patching, "
        "attribution patching (AtP) and AtP* (Kramár et al. 2024).",
        epilog="Run 'atpstar COMMAND --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (
        _add_demo,
        _add_run,
        _add_compare,
        _add_verify,
        _add_bound,
        add_find_parser,
        add_circuit_parser,
        add_mib_parser,
    ):
        add(sub)
    sub.add_parser("models", help="list the built-in models", description="List the built-in models (--model NAME).")
    sub.add_parser("methods", help="list the method ids", description="List the method ids with one-line descriptions.")
    return parser


def _add_demo(sub: Subparsers) -> None:
    demo = command(
        sub,
        "demo",
        "AtP* on the built-in SmolLM2-135M with IOI prompts, top nodes verified",
        "The main job on the built-in default: SmolLM2-135M on IOI prompt pairs, AtP* "
        "over all node types, the top components verified by exact activation "
        "patching, a table printed and report.html written (~2 min on 2 CPU cores).",
        task=False,
        default_model="smollm2-135m",
    )
    demo.add_argument("--pairs", type=int, default=4, metavar="N", help="number of IOI prompt pairs (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the prompt draw (default 0)")
    demo.add_argument(
        "--nodes",
        default="all",
        help="node types: all, attention, qkv, or a comma list of neuron,query,key,value,head (default all)",
    )
    demo.add_argument(
        "--budget",
        type=int,
        default=50,
        metavar="N",
        help="nodes to verify by exact patching, in AtP* order (default 50)",
    )
    demo.add_argument(
        "--bound-samples",
        type=int,
        default=0,
        metavar="N",
        help="if > 0, also bound the unverified nodes' effects with N subsampling samples (default 0: off)",
    )
    outputs(demo, "out/demo", workers=False)


def _add_run(sub: Subparsers) -> None:
    run = command(
        sub,
        "run",
        "one attribution method on a model and task",
        "Run one method, save the result (estimate.json + estimate.safetensors), "
        "a CSV of top nodes, heatmaps and report.html.",
    )
    run.add_argument("--method", default="atp*", help="method id (see 'atpstar methods'; default atp*)")
    run.add_argument("--nodes", default="all", help="node types: all, attention, qkv, or a comma list (default all)")
    run.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, repeatable, e.g. --option samples=128 (values parsed as JSON when they can be)",
    )
    run.add_argument(
        "--verify", type=int, default=0, metavar="N", help="also verify the top N nodes exactly (default 0)"
    )
    outputs(run, "out/run")


def _add_compare(sub: Subparsers) -> None:
    compare = command(
        sub,
        "compare",
        "compare methods by cost of verified recall against exhaustive patching",
        "Compute (or reuse from --out) the exhaustive ground truth by activation "
        "patching, run each method, and write cost-of-verified-recall tables "
        "(markdown + CSV), plots and report.html. The ground truth is checkpointed "
        "to OUT/ground_truth.ckpt.safetensors (OUT/ground_truth.units/ with --workers) and resumes when "
        "interrupted; "
        "results already in OUT are reused unless --recompute.",
    )
    compare.add_argument(
        "--methods", default=COMPARE_DEFAULT, help=f"comma list of method ids (default {COMPARE_DEFAULT})"
    )
    compare.add_argument(
        "--nodes", default="attention", help="node types: all, attention, qkv, or a comma list (default attention)"
    )
    compare.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="[METHOD:]KEY=VALUE",
        help="a method option, repeatable; METHOD: limits it to one method, e.g. --option blocks:block_size=8",
    )
    compare.add_argument(
        "--setting",
        choices=["per_pair", "distribution", "both"],
        default="both",
        help="rank nodes per single prompt pair (geometric mean over pairs), over the distribution "
        "of pairs, or both (default both)",
    )
    compare.add_argument(
        "--k-max",
        type=int,
        default=None,
        metavar="K",
        help="largest K on the curves (default min(1000, nodes with non-zero effect))",
    )
    compare.add_argument(
        "--verification",
        choices=["forward", "partial"],
        default="forward",
        help="what one patched forward of a verification costs: forward (1, default) or partial ((L - l)/L for a "
        "node at layer l). A verification patches the node on every pair ranked: P forwards over the distribution",
    )
    compare.add_argument(
        "--recompute",
        action="store_true",
        help="discard results and checkpoints saved in --out (also those of another model or options) and compute again",
    )
    outputs(compare, "out/compare")


def _add_verify(sub: Subparsers) -> None:
    verify = command(
        sub,
        "verify",
        "verify an estimate's top nodes by exact activation patching",
        "Patch the nodes of a saved estimate in its ranking order, exactly, and save "
        "the exact effects (verified.json + verified.safetensors) for 'atpstar bound'.",
    )
    verify.add_argument(
        "--estimate",
        required=True,
        metavar="PATH",
        help="saved estimate without extension, e.g. out/run/estimate (from 'atpstar run')",
    )
    verify.add_argument("--budget", type=int, default=50, metavar="N", help="nodes to verify (default 50)")
    verify.add_argument(
        "--threshold", type=float, default=None, help="also stop once an estimate's |score| falls below this value"
    )
    outputs(verify, "out/verify")


def _add_bound(sub: Subparsers) -> None:
    bound = command(
        sub,
        "bound",
        "bound the effects of the nodes left unverified",
        "Run subsampling over the unverified nodes only and report an upper confidence "
        "bound on the largest remaining |effect| and a union bound on the probability "
        "that some remaining node has |effect| >= theta (assumes near-additive "
        "effects).",
    )
    bound.add_argument(
        "--verified",
        required=True,
        metavar="PATH",
        help="saved verification without extension, e.g. out/verify/verified (from 'atpstar verify')",
    )
    bound.add_argument("--theta", type=float, required=True, help="effect size the union bound is about")
    bound.add_argument("--samples", type=int, default=256, help="subsampling samples per pair (default 256)")
    bound.add_argument("--p", type=float, default=0.5, help="probability a node is in a sample (default 0.5)")
    bound.add_argument("--alpha", type=float, default=0.05, help="confidence level 1 - alpha (default 0.05)")
    bound.add_argument("--bound-seed", type=int, default=0, help="subsampling seed of the bound (default 0)")
    outputs(bound, "out/bound")
