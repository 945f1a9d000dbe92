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
# # Many workers
#
# *Runs on the built-in `toy-ioi` model with two Ray workers on this machine's CPUs; executed in
# every documentation build, about a minute (most of it Ray starting). Needs the `distributed`
# extra (`pip install 'atpstar[distributed]'`; `make setup` installs it).*
#
# Exact patching, verification, Subsampling, Blocks, Hierarchical and the bound are lists of
# **work units**. In-process a `LocalExecutor` runs them one after another; with `workers=N` a
# `RayExecutor` runs them on N Ray actors (one per GPU on a GPU cluster). The units and their merge
# are the same, so the numbers are the same. The full story, and a GPU-hours plan for an 8B model:
# [Many workers and GPUs](../distributed.md).

# %%
import tempfile
from pathlib import Path

import torch

import atpstar

model = atpstar.load_model("toy-ioi")
pairs = atpstar.tasks.ioi(model.tokenizer, 8, seed=0)
nodes = ["query", "key", "value", "head"]
folder = Path(tempfile.mkdtemp())

here = atpstar.attribute(model, pairs, "activation_patching", nodes=nodes)
print("in-process:", here.cost)

# %% [markdown]
# ## The same sweep on two workers
#
# `workers=2` starts a local Ray instance with two actors (`ray_address="auto"` joins a cluster
# started with `ray start`). Each actor loads the built-in model by name; a model you changed is
# shipped once through Ray's object store. `checkpoint=` is a folder: one file per finished unit.

# %%
there = atpstar.attribute(model, pairs, "activation_patching", nodes=nodes, workers=2,
                          checkpoint=str(folder / "truth.units"))
print("on 2 workers:", there.cost)
print({k: there.info.get(k) for k in ("workers", "units", "units_resumed", "units_retried")})
worst = max(float((here.per_pair[t] - there.per_pair[t]).abs().max()) for t in nodes)
print(f"largest difference from the in-process run: {worst:.2e}")
assert worst < 1e-4

# %% [markdown]
# The effects agree to float32 rounding: only which nodes share a batched forward differs. The
# patched forwards are the in-process ones; the cost is a little higher because each worker runs
# the clean and noise forwards of the pairs it works on (`info["prepare_runs"]`).
#
# ## Resuming
#
# Rerunning the same call with the same checkpoint folder skips the finished units: after a kill,
# a lost node or Ctrl-C nothing finished is computed again. The cost still reports the whole
# computation, with the clean and noise forwards that several workers repeated counted once.

# %%
again = atpstar.attribute(model, pairs, "activation_patching", nodes=nodes, workers=2,
                          checkpoint=str(folder / "truth.units"))
print({k: again.info.get(k) for k in ("units", "units_resumed")}, again.cost)
assert torch.equal(again.per_pair["head"], there.per_pair["head"])

# %% [markdown]
# ## Estimates, verification and the bound
#
# Methods whose pairs do not interact (the AtP family and `atp+ig`) run by blocks of pairs and
# merge with `Attribution.concat`; `verify`, `false_negative_bound` and `find` take `workers=` too.

# %%
estimate = atpstar.attribute(model, pairs, "atp+qkfix", nodes=nodes, workers=2)
checked = atpstar.verify(model, pairs, estimate, budget=20, workers=2)
bound = atpstar.false_negative_bound(model, pairs, checked, theta=0.5, samples=256, workers=2)
print(checked)
print(bound)

# %% [markdown]
# On this 2-layer model 256 samples leave the bound loose: it cannot rule out an effect of 0.5
# among the 460 nodes left. Why, and how `find` plans the samples so that a bound can certify:
# [The bound and the certificate](../explanation/bound.md).

# %%
import ray

ray.shutdown()

# %% [markdown]
# On the command line the same options are `--workers N` and `--ray-address ADDR`:
#
#     atpstar compare --model EleutherAI/pythia-410m --task ioi --nodes attention --workers 4 --ray-address auto --out out/cmp
