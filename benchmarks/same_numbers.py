"""Check that a change leaves every method's numbers unchanged: dump results, then compare two dumps.

Every registered method on tiny float64 GPT-2 / GPT-NeoX / Llama-GQA models (2 and 4 layers, random
weights, 3 pairs, both directions; AtP-family methods in batches of 2), per_pair, scores and cost.

Usage (from the repository root):
    git worktree add /tmp/before <commit>        # the sources before the change
    PYTHONPATH=/tmp/before/src python benchmarks/same_numbers.py dump before.pt
    PYTHONPATH=src python benchmarks/same_numbers.py dump after.pt
    python benchmarks/same_numbers.py compare before.pt after.pt   # bit-equal count, and anything past rtol
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

NODES = ["neuron", "query", "key", "value", "head"]


def dump(path: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    warnings.filterwarnings("ignore")
    import atpstar
    from atpstar.methods.base import METHODS
    from reference.models import build_hf, load, make_pairs

    torch.set_num_threads(1)
    out = {}
    for family in ("gpt2", "gpt_neox", "llama"):
        for n_layers in (2, 4):
            model = load(build_hf(family, n_layers=n_layers, seed=3))
            pairs = make_pairs(n_pairs=3, seq_len=6)
            for method in METHODS:
                for direction in ("noising", "denoising"):
                    options = {"batch_size": 2} if method.startswith("atp") and method != "atp+ig" else {}
                    result = atpstar.attribute(model, pairs, method=method, nodes=NODES, direction=direction, **options)
                    per_pair = {t: v.to_dense() if v.is_sparse else v for t, v in result.per_pair.items()}
                    out[(family, n_layers, method, direction)] = (
                        per_pair, dict(result.scores), result.cost.forward, result.cost.backward
                    )  # fmt: skip
    torch.save(out, path)
    print(f"{len(out)} results -> {path}")


def compare(before_path: str, after_path: str, rtol: float = 1e-12) -> int:
    before, after = torch.load(before_path, weights_only=False), torch.load(after_path, weights_only=False)
    if before.keys() != after.keys():
        print("different runs:", sorted(set(before) ^ set(after)))
        return 1
    unequal = outside = 0
    for key, (pp_a, sc_a, fwd_a, bwd_a) in before.items():
        pp_b, sc_b, fwd_b, bwd_b = after[key]
        if (fwd_a, bwd_a) != (fwd_b, bwd_b):
            print("cost differs", key, (fwd_a, bwd_a), (fwd_b, bwd_b))
            outside += 1
        for t in pp_a:
            for a, b, what in ((pp_a[t], pp_b[t], "per_pair"), (sc_a[t], sc_b[t], "scores")):
                if not torch.equal(a, b):
                    unequal += 1
                    if not torch.allclose(a, b, rtol=rtol, atol=0):
                        outside += 1
                        print("differs", key, t, what, float((a - b).abs().max()))
    print(f"{len(before)} results; {unequal} tensors not bit-equal; {outside} outside rtol={rtol:g}")
    return int(outside > 0)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "dump":
        dump(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
