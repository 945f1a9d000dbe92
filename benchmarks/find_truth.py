"""Exhaustive ground truth for the ``find`` benchmark (cached under out/find_bench/, resumable).

Run:  PYTHONPATH=src python benchmarks/find_truth.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import atpstar
from atpstar import tasks

OUT = Path("out/find_bench")
ATTENTION = ["query", "key", "value", "head"]
SETTINGS = {  # name -> (model, task, n_pairs, node types); n pairs = the first n of the 4 drawn with seed 0
    "toy_ioi_1": ("toy-ioi", "ioi", 1, ["neuron", "query", "key", "value", "head"]),
    "toy_ioi_4": ("toy-ioi", "ioi", 4, ["neuron", "query", "key", "value", "head"]),
    "smollm2_ioi_1": ("smollm2-135m", "ioi", 1, ATTENTION),
    "smollm2_cities_1": ("smollm2-135m", "cities", 1, ATTENTION),
    "smollm2_ioi_4": ("smollm2-135m", "ioi", 4, ATTENTION),
    "smollm2_cities_4": ("smollm2-135m", "cities", 4, ATTENTION),
}


def make_pairs(model: atpstar.Model, task: str, n: int, seed: int = 0) -> atpstar.PromptPairs:
    return getattr(tasks, task)(model.tokenizer, 4, seed=seed).subset(list(range(n)))


def truth(name: str, model: atpstar.Model | None = None, progress: bool = False) -> atpstar.Attribution:
    """The setting's exhaustive activation patching (computed once, then loaded)."""
    path = OUT / name / "truth"
    if Path(str(path) + ".json").is_file():
        return atpstar.Attribution.load(path)
    model_id, task, n, nodes = SETTINGS[name]
    model = model or atpstar.load_model(model_id)
    pairs = make_pairs(model, task, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    result = atpstar.attribute(
        model, pairs, "activation_patching", nodes, checkpoint=str(path) + ".ckpt.safetensors", progress=progress
    )
    result.info["wall_s"] = time.monotonic() - start
    result.save(path)
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:] or list(SETTINGS):
        t0 = time.monotonic()
        result = truth(name, progress=True)
        print(f"{name}: {result.cost} in {time.monotonic() - t0:.0f} s", flush=True)
