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
# # Your own task from a JSONL file
#
# *Runs on the built-in `toy-ioi` model; executed in every documentation build, under a minute.*
#
# A task is a set of prompt pairs: a clean prompt that shows the behaviour, a noise prompt of the
# same token length that does not, the answer token the metric rewards and (optionally) a
# distractor it penalises. Write them as JSON lines, one pair a line:
#
#     {"clean": "...", "noise": "...", "answer": " X", "distractor": " Y"}
#
# With a distractor on every line the metric is the logit difference answer − distractor at the
# last position; without one it is the answer's log-probability. Blank lines and lines starting
# with `#` are skipped.

# %%
import json
import tempfile
from pathlib import Path

folder = Path(tempfile.mkdtemp())
lines = [
    {"clean": "When Mary and John went to the park, John gave a book to",
     "noise": "When Lisa and Paul went to the park, Mark gave a book to", "answer": " Mary", "distractor": " John"},
    {"clean": "Then Tom and Anna went to the school, Anna gave a ring to",
     "noise": "Then Ruth and Adam went to the school, Kate gave a ring to", "answer": " Tom", "distractor": " Anna"},
    {"clean": "After Emma and Sam went to the store, Sam gave a drink to",
     "noise": "After Lucy and Dan went to the store, Ryan gave a drink to", "answer": " Emma", "distractor": " Sam"},
]
task = folder / "my_pairs.jsonl"
task.write_text("# name mover pairs\n" + "\n".join(json.dumps(line) for line in lines) + "\n")
print(task.read_text())

# %% [markdown]
# ## In Python
#
# `read_pairs_jsonl` tokenizes the file with the model's tokenizer and checks every line: equal
# token lengths of clean and noise, single-token answers, words the tokenizer knows.

# %%
import atpstar

model = atpstar.load_model("toy-ioi")
pairs = atpstar.read_pairs_jsonl(task, model.tokenizer)
print(pairs)
result = atpstar.attribute(model, pairs, method="atp+qkfix", nodes=["query", "key", "value", "head"])
for node in result.top(5):
    print(f"{node.name:40s} {node.score:7.3f}")
checked = atpstar.verify(model, pairs, result, budget=5)
print([round(e, 3) for e in checked.mean_effects.tolist()])

# %% [markdown]
# ## From the command line
#
# `atpstar run --task FILE.jsonl` does the same and writes the results, a CSV of the top nodes,
# plots and `report.html` to `--out`.

# %%
import subprocess
import sys

out = folder / "run"
command = [sys.executable, "-m", "atpstar.cli", "run", "--model", "toy-ioi", "--task", str(task),
           "--method", "atp+qkfix", "--nodes", "query,key,value,head", "--verify", "5", "--out", str(out)]
done = subprocess.run(command, capture_output=True, text=True)
print(done.stdout)
print(sorted(p.name for p in out.iterdir() if not p.name.startswith(".")))

# %% [markdown]
# ## When a line is wrong
#
# A bad line is reported with the file, its line number and what to do; the command line prints
# the same message as one `error:` line and exits with status 2. Here the noise prompt is one token
# shorter than the clean one, and in the second file a word is not in the toy model's vocabulary.

# %%
bad = folder / "bad.jsonl"
bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[1], "noise": "Then Ruth and Adam went to the school, gave a ring to"}) + "\n")
try:
    atpstar.read_pairs_jsonl(bad, model.tokenizer)
except atpstar.InputError as error:
    print("InputError:", error)

unknown = folder / "unknown.jsonl"
unknown.write_text(json.dumps({**lines[0], "clean": lines[0]["clean"].replace("park", "beach")}) + "\n")
done = subprocess.run([*command[:7], str(unknown), "--out", str(folder / "bad_run")], capture_output=True, text=True)
print("exit status", done.returncode)
print(done.stderr.strip().splitlines()[-1])

# %% [markdown]
# More messages and what they mean: [Bad inputs and errors](../howto/errors.py).
