"""Digest of ``atpstar.find`` results on small models, to compare two source trees (same numbers or not).

Run:  PYTHONPATH=OLD/src python benchmarks/find_digest.py > old.json
      PYTHONPATH=src python benchmarks/find_digest.py > new.json && cmp old.json new.json
Cases: the planted additive toy of the tests (4,096 neurons; with and without a budget) and toy-ioi
attention nodes on one IOI pair; printed: certified, nodes, effects, cost per stage, history, final bound.
"""

import json
import sys

import torch

sys.path.insert(0, "tests")
import atpstar
from reference.toys import sparse_additive_toy

torch.set_num_threads(1)
out = {}
model, pairs = sparse_additive_toy(planted=True, seq_len=16, d_mlp=256)
truth = atpstar.attribute(model, pairs, "activation_patching", nodes=["neuron"])
theta = 0.5 * float(truth.scores["neuron"].abs().max())
for name, kw in {
    "toy": dict(estimator="atp", patience=4),
    "toy_budget": dict(estimator="atp", patience=4, budget=300.0),
}.items():
    f = atpstar.find(model, pairs, theta, nodes=["neuron"], **kw)
    out[name] = [
        f.certified,
        f.nodes,
        f.effects.tolist(),
        {k: c.forward_equivalents for k, c in f.cost.items()},
        f.history,
        f.bound.max_effect_upper if f.bound else None,
    ]
m = atpstar.load_model("toy-ioi")
p = atpstar.tasks.ioi(m.tokenizer, 4, seed=0).subset([0])
f = atpstar.find(m, p, 0.3, nodes=["query", "key", "value", "head"])
out["toy_ioi_attn"] = [
    f.certified,
    f.nodes,
    f.effects.tolist(),
    {k: c.forward_equivalents for k, c in f.cost.items()},
    f.history,
]
print(json.dumps(out, default=str, sort_keys=True))
