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
# # Bad inputs and what the errors mean
#
# *This page is executed when the site is built: every message below is the one this version
# raises, not a copy.*
#
# Everything a user can cause raises a subclass of `atpstar.AtpstarError` (itself a `ValueError`),
# **before the first expensive pass**, with a message that names the thing, says what was wrong and
# what to do. The command line prints it as one `error: ...` line and exits with status 2, never a
# traceback.
#
# | class | raised when |
# |---|---|
# | `InputError` | prompt pairs, metrics, node types, options, files or folders are malformed |
# | `UnsupportedModelError` | the model's family or one of its attention features is not implemented |
# | `CorruptFileError` (an `InputError`) | a saved file is truncated, corrupt, of another kind or format version, or half of a pair |
# | `IdentityMismatchError` (an `InputError`) | a saved result was made by another model, prompt set, direction, metric, node types or options |
# | `BusyError` (an `InputError`) | another process works on the same output folder (the message gives its pid) |
# | `OutOfMemory` | one batch element does not fit in the accelerator's memory, after halving the batch on every out-of-memory error |

# %%
import atpstar

model = atpstar.load_model("toy-ioi")
pairs = atpstar.tasks.ioi(model.tokenizer, 4, seed=0)


def show(call):
    """Run call and print the error it raises, as the command line would."""
    try:
        call()
    except atpstar.AtpstarError as error:
        print(f"{type(error).__name__}: {error}")
    else:
        raise AssertionError("no error raised")


# %% [markdown]
# ## Methods, node types and options
#
# A wrong name lists the right ones; a bad option value says the allowed range.

# %%
show(lambda: atpstar.attribute(model, pairs, method="atp-star", nodes=["head"]))
show(lambda: atpstar.attribute(model, pairs, method="atp", nodes=["heads"]))
show(lambda: atpstar.attribute(model, pairs, method="subsampling", nodes=["head"], samples=0))
show(lambda: atpstar.attribute(model, pairs, method="atp", nodes=["head"], sample=3))
show(lambda: atpstar.attribute(model, pairs, method="atp", nodes=["head"], direction="backwards"))

# %% [markdown]
# ## Prompt pairs
#
# Clean and noise prompts must have the same number of tokens (a node is a component at one
# position, and the positions must line up); answers and distractors must be single tokens; every
# word must be in the tokenizer's vocabulary; the prompts must fit the model's positions.

# %%
tok = model.tokenizer
show(lambda: atpstar.PromptPairs.from_text(tok, clean=["When Mary and John went to the store, John gave a book to"],
                                           noise=["When Mary and John went to the store, gave a book to"],
                                           answer=[" Mary"], distractor=[" John"]))
show(lambda: atpstar.PromptPairs.from_text(tok, clean=["When Mary and John went to the beach, John gave a book to"],
                                           noise=["When Lisa and Paul went to the beach, Mark gave a book to"],
                                           answer=[" Mary"], distractor=[" John"]))
show(lambda: atpstar.PromptPairs.from_text(tok, clean=["When Mary and John went to the store, John gave a book to"],
                                           noise=["When Lisa and Paul went to the store, Mark gave a book to"],
                                           answer=[" Mary and"], distractor=[" John"]))
long = "When Mary and John went to the" + " store, the" * 30 + " store, John gave a book to"   # past the toy model's 64 positions
show(lambda: atpstar.attribute(model, atpstar.PromptPairs.from_text(tok, clean=[long], noise=[long.replace("Mary", "Lisa")],
                                                                    answer=[" Mary"], distractor=[" John"]),
                               method="atp", nodes=["head"]))

# %% [markdown]
# ## Metrics
#
# A metric is `"logit_diff"`, `"logprob"` or a function `f(logits [B, V], answer [B], distractor [B] | None) -> [B]`.
# A metric that returns NaN or infinity, or that gradients cannot flow through, is refused.

# %%
import torch

nan_metric = atpstar.PromptPairs(pairs.clean, pairs.noise, pairs.answer, pairs.distractor,
                                 metric=lambda logits, answer, distractor: logits[:, 0] * float("nan"))
show(lambda: atpstar.attribute(model, nan_metric, method="atp", nodes=["head"]))
flat_metric = atpstar.PromptPairs(pairs.clean, pairs.noise, pairs.answer, pairs.distractor,
                                  metric=lambda logits, answer, distractor: logits.argmax(-1).float())
show(lambda: atpstar.attribute(model, flat_metric, method="atp", nodes=["head"]))

# %% [markdown]
# ## Memory
#
# A budget that cannot hold the run is refused before any pass, with the plan (`predict_memory`
# makes the same plan without running; here: the neuron effects of 100,000 pairs kept in memory).

# %%
show(lambda: atpstar.predict_memory(model, n_pairs=100_000, seq_len=15, method="activation_patching",
                                    nodes=["neuron"], memory_gb=1.0))

# %% [markdown]
# ## Results from another computation
#
# `verify`, the bound and `evaluate` refuse an estimate made on another model or other pairs, naming
# what differs; a truncated or mixed-up file is reported as corrupt.

# %%
import tempfile
from pathlib import Path

estimate = atpstar.attribute(model, pairs, method="atp", nodes=["head"])
other = atpstar.tasks.ioi(model.tokenizer, 4, seed=1)
show(lambda: atpstar.verify(model, other, estimate, budget=5))

folder = Path(tempfile.mkdtemp())
estimate.save(folder / "estimate")
data = (folder / "estimate.safetensors").read_bytes()
(folder / "estimate.safetensors").write_bytes(data[: len(data) // 2])
show(lambda: atpstar.Attribution.load(folder / "estimate"))

# %% [markdown]
# ## Models
#
# An unsupported family names what is missing and lists what is supported.

# %%
from transformers import BertConfig, BertForMaskedLM

bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64))
show(lambda: atpstar.load_model(bert))

# %% [markdown]
# ## On the command line
#
# The same checks run before the model loads; the message is one `error:` line, the exit status 2.

# %%
import subprocess
import sys

done = subprocess.run([sys.executable, "-m", "atpstar.cli", "run", "--model", "toy-ioi", "--task", "ioi",
                       "--method", "atp", "--nodes", "heads", "--out", str(folder / "run")],
                      capture_output=True, text=True)
print("exit status:", done.returncode)
print(done.stderr.strip())
