"""Check that a change leaves every number the package computes unchanged: dump results, then compare.

What it runs, on tiny float64 GPT-2 / GPT-NeoX / Llama-GQA models (random weights, 3 pairs of 6 tokens):

- ``attribute`` with every registered method over the node types (2 and 4 layers, both directions;
  AtP-family methods in batches of 2);
- ``attribute`` over edges (``nodes=["edge"]``) with every method that supports them (both
  directions);
- ``verify`` of an ``atp*`` estimate (a budget of a few nodes), nodes and edges;
- ``false_negative_bound`` of that verification (fixed seed, 48 samples, both ways to combine), nodes and edges;
- ``find`` (theta under the 4th and the 13th largest exact effect), nodes and edges; and ``find`` on the
  planted sparse toy of the tests, where it certifies through its bound rounds.

Every tensor field, every node list and scalar, and every cost is recorded. Only the public API
(``atpstar.attribute/verify/false_negative_bound/find``, ``atpstar.METHODS`` and result fields) is used, so
the same script runs on the sources before and after a change. The models and pairs come from
``tests/reference`` of the tree whose ``atpstar`` is imported (this script's tree if it has none).
A dump takes about 1.5 minutes on one thread.

Usage (from the repository root):
    git worktree add /tmp/before <commit>        # the sources before the change
    PYTHONPATH=/tmp/before/src python benchmarks/same_numbers.py dump before.pt
    PYTHONPATH=src python benchmarks/same_numbers.py dump after.pt
    python benchmarks/same_numbers.py compare before.pt after.pt   # bit-equal count, and anything past rtol
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

NODES = ["neuron", "query", "key", "value", "head"]
EDGE = ["edge"]
EDGE_METHODS = ("activation_patching", "atp", "atp+qkfix", "atp+graddrop", "atp*", "atp+ig")
FAMILIES = ("gpt2", "gpt_neox", "llama")
N_PAIRS, SEQ_LEN = 3, 6
VERIFY_BUDGET = 6
BOUND = {"theta": 0.1, "samples": 48, "seed": 2}


def _cost(cost: Any) -> tuple[float, float]:
    return (float(cost.forward), float(cost.backward))


def _dense(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {t: (v.to_dense() if v.is_sparse else v) for t, v in tensors.items()}


def _nodes(nodes: Any) -> list[tuple[str, tuple[int, ...]]]:
    return [(str(t), tuple(int(i) for i in index)) for t, index in nodes]


def _attribution(result: Any) -> dict[str, Any]:
    return {"per_pair": _dense(result.per_pair), "scores": dict(result.scores), "cost": _cost(result.cost)}


def _verification(v: Any) -> dict[str, Any]:
    return {
        "nodes": _nodes(v.nodes),
        "effects": v.effects,
        "estimate_scores": v.estimate_scores,
        "base_metric": v.base_metric,
        "cost": _cost(v.cost),
    }


def _bound(b: Any) -> dict[str, Any]:
    return {
        "max_effect_upper": float(b.max_effect_upper),
        "prob_upper": float(b.prob_upper),
        "n_unverified": int(b.n_unverified),
        "worst_node": None if b.worst_node is None else _nodes([b.worst_node])[0],
        "estimate": dict(b.estimate),
        "upper": dict(b.upper),
        "cost": _cost(b.cost),
    }


def _localization(found: Any) -> dict[str, Any]:
    return {
        "nodes": _nodes(found.nodes),
        "effects": found.effects,
        "verified": _verification(found.verified),
        "bound": None if found.bound is None else _bound(found.bound),
        "certified": bool(found.certified),
        "cost": {stage: _cost(c) for stage, c in found.cost.items()},
        "history": [dict(row) for row in found.history],
        "exhaustive_cost": float(found.exhaustive_cost),
    }


def _options(method: str) -> dict[str, Any]:
    return {"batch_size": 2} if method.startswith("atp") and method != "atp+ig" else {}


def _edge_methods(atpstar: Any) -> list[str]:
    """Registered methods that score edges: by their declared node types, else by the 0.2 list."""
    found = []
    for method, registered in atpstar.METHODS.items():
        types = getattr(getattr(registered, "cls", None), "node_types", None)
        if ("edge" in types) if types is not None else (method in EDGE_METHODS):
            found.append(method)
    return found


def run_all() -> dict[tuple[Any, ...], dict[str, Any]]:
    """Every run of the module docstring: key -> record of named fields."""
    warnings.filterwarnings("ignore")
    import atpstar

    # The test models of the tree being measured (its tests/ next to its src/), else this script's tree.
    for root in (Path(atpstar.__file__).resolve().parents[2], Path(__file__).resolve().parents[1]):
        if (root / "tests" / "reference" / "models.py").is_file():
            sys.path.insert(0, str(root / "tests"))
            break
    from reference.models import build_hf, load, make_pairs
    from reference.toys import sparse_additive_toy

    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    edge_methods = _edge_methods(atpstar)
    for family in FAMILIES:
        for n_layers in (2, 4):
            model = load(build_hf(family, n_layers=n_layers, seed=3))
            pairs = make_pairs(n_pairs=N_PAIRS, seq_len=SEQ_LEN)
            for method in atpstar.METHODS:
                for direction in ("noising", "denoising"):
                    result = atpstar.attribute(
                        model, pairs, method=method, nodes=NODES, direction=direction, **_options(method)
                    )
                    out[("attribute", family, n_layers, method, "nodes", direction)] = _attribution(result)
            for method in edge_methods:
                for direction in ("noising", "denoising"):
                    result = atpstar.attribute(
                        model, pairs, method=method, nodes=EDGE, direction=direction, **_options(method)
                    )
                    out[("attribute", family, n_layers, method, "edge", direction)] = _attribution(result)
            for kind, nodes in (("nodes", NODES), ("edge", EDGE)):
                out.update(_certify(atpstar, model, pairs, family, n_layers, kind, nodes))
    # The tiny models above are cheaper to verify exhaustively than to bound, so ``find`` never reaches its
    # bound rounds there; on this one (4,096 neurons, two planted) it certifies through the bound.
    model, pairs = sparse_additive_toy(planted=True, seq_len=16, d_mlp=256)
    truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["neuron"])
    theta = 0.5 * float(truth.scores["neuron"].abs().max())
    for estimator in ("atp", "atp+ig"):  # one layer: no GradDrop (atp*)
        found = atpstar.find(model, pairs, theta, nodes=["neuron"], estimator=estimator, patience=4)
        out[("find", "planted_toy", 1, "neuron", estimator)] = {"theta": theta, **_localization(found)}
    return out


def _certify(atpstar: Any, model: Any, pairs: Any, family: str, n_layers: int, kind: str, nodes: list[str]) -> Any:
    """verify / false_negative_bound / find on one model and one kind of node."""
    key = (family, n_layers, kind)
    estimate = atpstar.attribute(model, pairs, method="atp*", nodes=nodes, batch_size=2)
    verified = atpstar.verify(model, pairs, estimate, budget=VERIFY_BUDGET)
    yield ("verify", *key), _verification(verified)
    for combine in ("iut", "bonferroni"):
        bound = atpstar.false_negative_bound(model, pairs, verified, combine=combine, **BOUND)
        yield ("bound", *key, combine), _bound(bound)
    truth = atpstar.attribute(model, pairs, method="activation_patching", nodes=nodes)
    ranked = torch.cat([s.abs().flatten() for s in truth.scores.values()]).sort(descending=True).values
    for k in (3, 12):  # theta just under the k-th largest exact effect
        theta = float(ranked[k]) * 0.999
        found = atpstar.find(model, pairs, theta, nodes=nodes, estimator="atp*", patience=4, seed=1)
        yield ("find", *key, k), {"theta": theta, **_localization(found)}


def dump(path: str) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    out = run_all()
    part = Path(path).with_name(Path(path).name + ".part")
    torch.save(out, part)
    part.replace(path)  # readers never see a half-written file
    print(f"{len(out)} results -> {path} ({time.perf_counter() - start:.0f} s)")


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Flatten nested dicts/lists of records into path -> leaf (tensor, number, string, tuple of ints...)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{path}/{key}").items()}
    if isinstance(value, list) and any(isinstance(item, (dict, torch.Tensor)) for item in value):
        return {k: v for i, item in enumerate(value) for k, v in _leaves(item, f"{path}[{i}]").items()}
    return {path: value}


def _same(a: Any, b: Any, rtol: float) -> tuple[bool, bool, float]:
    """(bit-equal, within rtol, max abs difference) of two leaves; NaN equals NaN."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, False, math.inf
        if torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all()):
            return True, True, 0.0
        close = bool(torch.isclose(a, b, rtol=rtol, atol=0, equal_nan=True).all())
        diff = (a.double() - b.double()).abs().nan_to_num(math.inf)
        return False, close, float(diff.max())
    if isinstance(a, float) and isinstance(b, float):
        if a == b or (math.isnan(a) and math.isnan(b)):
            return True, True, 0.0
        return False, math.isclose(a, b, rel_tol=rtol, abs_tol=0.0), abs(a - b)
    return a == b, a == b, 0.0 if a == b else math.inf


def compare(before_path: str, after_path: str, rtol: float = 1e-12) -> int:
    before, after = torch.load(before_path, weights_only=False), torch.load(after_path, weights_only=False)
    if before.keys() != after.keys():
        print("different runs:", sorted(set(before) ^ set(after), key=str))
        return 1
    leaves = unequal = outside = 0
    for key in before:
        a, b = _leaves(before[key]), _leaves(after[key])
        if a.keys() != b.keys():
            print("different fields", key, sorted(set(a) ^ set(b)))
            outside += 1
            continue
        for field in a:
            leaves += 1
            equal, close, diff = _same(a[field], b[field], rtol)
            unequal += not equal
            if not close:
                outside += 1
                shown = (
                    f"{diff:.3g}" if isinstance(a[field], (torch.Tensor, float)) else f"{a[field]!r} != {b[field]!r}"
                )
                print("differs", key, field, shown)
    print(
        f"{len(before)} results, {leaves} fields; {unequal} not bit-equal; {outside} outside rtol={rtol:g} "
        "(costs, node lists and counts must be equal)"
    )
    return int(outside > 0)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "dump":
        dump(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
