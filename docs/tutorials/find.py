# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Certified localization with find
#
# *Runs on the built-in `toy-ioi` model; executed in every documentation build, under a minute.
# The same search on SmolLM2, where the bound pays for itself, is in the
# [SmolLM2 tutorial](smollm2_ioi.py) (full build only).*
#
# An estimate ranks nodes; it does not say whether a large node is missing from its top. `find`
# closes that gap. Given an effect size θ it returns every node with |c(n)| ≥ θ (c = the exact
# mean effect over the pairs), each verified by patching, and a **certificate**: with probability
# at least 1 − α (under the near-additivity assumption) no other node is that large.
#
# The loop ([explanation](../explanation/bound.md)):
#
# 1. AtP\* ranks all nodes;
# 2. nodes are verified in that order in windows, stopping after a window with no |c| ≥ θ;
# 3. a Subsampling bound covers the unverified rest (round r at level α/2^r);
# 4. nodes the bound cannot rule out are verified in the bound's order; repeat until certified,
#    the budget is spent, or verifying everything left is cheaper than another bound.
#
# Bounds are gambles: a bound that fails costs its samples and the nodes still have to be verified.
# `find` takes one only while, should it fail, verifying every node left still keeps the total within
# the estimate + (1 + `max_overspend`) × exhaustive patching (`max_overspend=0.1` by default); when no
# bound fits any more, it verifies the rest exactly. So without a `budget` it always ends certified.

# %%
import atpstar

model = atpstar.load_model("toy-ioi")
pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0).subset([0])   # the first pair, as in Results
nodes = ["neuron", "query", "key", "value", "head"]
found = atpstar.find(model, pairs, theta=0.3, nodes=nodes, alpha=0.05)
print(found)

# %% [markdown]
# ## Reading the certificate
#
# `certificate()` is the guarantee in numbers. The fields to read first:
#
# - `certified` and `statement`: whether the search proved that nothing ≥ θ is missing;
# - `assumption`: what the guarantee rests on (empty when every node was verified exactly);
# - `final_bound`: the last bound over the unverified nodes: how many were left, its upper bound on
#   their largest |c|, and the samples and p it used;
# - `cost_by_stage` and `cost_fraction_of_exhaustive`: what the certainty cost, in forward-pass
#   equivalents, against patching every node;
# - `certified_by`: `"bound"` (a calibrated bound covers the unverified nodes) or `"exhaustion"` (every
#   node was verified exactly, no assumption);
# - `stopped`, `fallback` and `finish`: why the loop ended, and why it patched every node (from the
#   start, or the rest after a bound) if it did.

# %%
import json

certificate = found.certificate()
print(json.dumps(certificate, indent=2, default=str))

# %% [markdown]
# Round by round:

# %%
for row in found.history:
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})

# %% [markdown]
# On this 2-layer model the bound does not pay: with about 800 nodes patched at once in a 2-layer
# model its standard errors are so large that it cannot rule out most of the nodes. The first bound was
# a gamble that fit (had it failed, verifying the rest would still stay within exhaustive patching plus
# 10 %); it flagged most nodes, `find` verified them, and when no further bound fit it verified the
# rest exactly: all 38 nodes above θ found, **certified by exhaustion**, at 1.03× exhaustive patching
# (0.2 certified the same search at 1.06×), within its ceiling of 1.1× plus the estimate
# ([design record 0026](../design/0026-gambles-and-cheaper-certificates.md)). The cell below checks it.

# %%
certificate = found.certificate()
assert len(found.nodes) == 38 and found.certified and certificate["certified_by"] == "exhaustion"
assert round(found.total_cost.forward_equivalents) == 12215
assert found.total_cost.forward_equivalents <= certificate["left"]["cost_ceiling"]
print(certificate["finish"])
print(f"{len(found.nodes)} nodes found; {found.total_cost.forward_equivalents:,.0f} forward equivalents, "
      f"{found.cost_fraction:.1%} of exhaustive patching ({found.exhaustive_cost:,.0f}); "
      f"ceiling {certificate['left']['cost_ceiling']:,.0f}")

# %% [markdown]
# ## A budget, and a certificate that says no
#
# `budget` caps the total cost in forward-pass equivalents, the estimate included: a hard ceiling,
# unlike `max_overspend`. A budget that runs out before the search is certified gives a result that
# says so (*not certified*), with what is left: the only way `find` ends without a certificate. A
# budget too small even for the estimate is refused before any pass.

# %%
short = atpstar.find(model, pairs, theta=0.3, nodes=nodes, budget=2000)
print(short.statement())
print("stopped:", short.certificate()["stopped"])
print("left:", short.certificate()["left"])
assert not short.certified and short.total_cost.forward_equivalents <= 2000

# %%
try:
    atpstar.find(model, pairs, theta=0.3, nodes=nodes, budget=3)
except atpstar.InputError as error:
    print("InputError:", error)

# %% [markdown]
# ## Saving, loading and resuming
#
# `save`/`Localization.load` keep the whole result (effects, bound, certificate). With
# `out_dir=...` each finished step is checkpointed; a rerun after Ctrl-C or a kill resumes and
# reports the whole computation's cost ([how-to](../howto/resume.md)).

# %%
import tempfile
from pathlib import Path

folder = Path(tempfile.mkdtemp())
found.save(folder / "found")
again = atpstar.Localization.load(folder / "found")
print(repr(again))
