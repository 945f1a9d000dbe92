"""Latent edges (feature circuits) against brute force from module hooks, float64, two families."""

from __future__ import annotations

import pytest
import torch

from atpstar.cost import Cost
from atpstar.features.latent_edges import (
    capture,
    exact_latent_edges,
    exact_metric_edges,
    in_forward_order,
    latent_edges_atp,
    metric_edges_atp,
)
from atpstar.job import Job
from features.reference import latent_edges
from reference.models import assert_rel_close, build_hf, load, make_pairs

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.2.hook_attn_out")


class RandomSAE:
    """A ReLU SAE with random weights (no normalisation, no decoder bias at the input)."""

    def __init__(self, hook: str, d_model: int, d_sae: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.name, self.hook, self.transcoder = f"sae{seed}", hook, False
        self.layer = int(hook.split(".")[1])
        self.W_enc = torch.randn(d_model, d_sae, generator=gen, dtype=torch.float64) / d_model**0.5
        self.b_enc = torch.full((d_sae,), 0.1, dtype=torch.float64)
        self.W_dec = torch.randn(d_sae, d_model, generator=gen, dtype=torch.float64) * 0.5

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc.to(x.dtype) + self.b_enc.to(x.dtype))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    hf = build_hf(request.param, n_layers=3)
    model, pairs = load(hf), make_pairs(n_pairs=2, seq_len=5)
    dicts = [RandomSAE(hook, model.d_model, 6, seed) for seed, hook in enumerate(HOOKS)]
    job = Job(model, pairs, "noising", Cost())
    return hf, model, pairs, dicts, job, capture(job, dicts)


def _active(captured, index: int, n: int) -> torch.Tensor:
    """The n (latent, pos) with the largest |Δf| summed over pairs: [n, 2]."""
    size = captured.delta[index].abs().sum(0)  # [T, S]
    top = size.flatten().topk(n).indices
    return torch.stack([top % size.shape[1], top // size.shape[1]], 1)


@pytest.mark.parametrize("index", [0, 1])
def test_latent_edges_match_brute_force(setup, index):
    hf, model, pairs, dicts, job, captured = setup
    up, down = _active(captured, index, 3), _active(captured, index + 1, 3)
    want_exact, want_linear = latent_edges(hf, pairs, dicts[index], dicts[index + 1], up.tolist(), down.tolist())
    got_exact = exact_latent_edges(job, captured, dicts, index, up, down)
    got_linear = latent_edges_atp(job, captured, dicts, index, up, down)
    assert want_exact.abs().max() > 1e-3, "the case must have edges to check"
    assert_rel_close(got_exact, want_exact, 1e-9, "exact latent edges")
    assert_rel_close(got_linear, want_linear, 1e-9, "AtP latent edges")


def test_metric_edges_match_brute_force(setup):
    hf, model, pairs, dicts, job, captured = setup
    up = _active(captured, 2, 4)
    want_exact, want_linear = latent_edges(hf, pairs, dicts[2], None, up.tolist())
    assert_rel_close(exact_metric_edges(job, captured, dicts, 2, up), want_exact, 1e-9, "exact latent -> metric")
    assert_rel_close(metric_edges_atp(captured, dicts[2], 2, up), want_linear, 1e-9, "AtP latent -> metric")


def test_forward_order():
    dicts = [RandomSAE(hook, 8, 2, seed) for seed, hook in enumerate(reversed(HOOKS))]
    assert [d.hook for d in in_forward_order(dicts)] == list(HOOKS)
