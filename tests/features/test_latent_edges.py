"""Latent edges (feature circuits) against brute force from module hooks, float64, two families."""

from __future__ import annotations

import pytest
import torch

from atpstar import load_dictionary
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
from atpstar.testing.fixtures import write_saelens
from features.reference import latent_edges
from reference.models import assert_rel_close, build_hf, load, make_pairs

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.2.hook_attn_out")


# (hook, activation, extra config): three activations, one with SAELens' per-token norm rescaling.
KINDS = (("relu", {}), ("topk", {"k": 3}), ("jumprelu", {"normalize_activations": "constant_norm_rescale"}))


def random_saes(folder, d_model: int, hooks=HOOKS, d_sae: int = 6) -> list:
    """Random SAELens dictionaries at ``hooks`` (``atpstar.testing`` writers), loaded in float64."""
    out = []
    for seed, (hook, (activation, cfg)) in enumerate(zip(hooks, KINDS)):
        path = write_saelens(folder / f"sae{seed}", hook, d_model, d_sae, seed=seed, activation=activation, **cfg)
        out.append(load_dictionary(path, name=f"sae{seed}", dtype=torch.float64))
    return out


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tmp_path_factory):
    hf = build_hf(request.param, n_layers=3)
    model, pairs = load(hf), make_pairs(n_pairs=2, seq_len=5)
    dicts = random_saes(tmp_path_factory.mktemp(request.param), model.d_model)
    job = Job(model, pairs, "noising", Cost())
    return hf, model, pairs, dicts, job, capture(job, dicts)


def _active(captured, index: int, n: int, first_pos: int = 0) -> torch.Tensor:
    """The n (latent, pos) at positions >= first_pos with the largest |Δf| summed over pairs: [n, 2]."""
    size = captured.delta[index].abs().sum(0)  # [T, S]
    size[:first_pos] = -1.0
    top = size.flatten().topk(n).indices
    return torch.stack([top % size.shape[1], top // size.shape[1]], 1)


@pytest.mark.parametrize("index", [0, 1])
def test_latent_edges_match_brute_force(setup, index):
    hf, model, pairs, dicts, job, captured = setup
    # Downstream latents late in the prompt, where upstream latents can reach them.
    up, down = _active(captured, index, 3), _active(captured, index + 1, 3, first_pos=pairs.seq_len - 2)
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


def test_forward_order(tmp_path):
    dicts = random_saes(tmp_path, 8, tuple(reversed(HOOKS)), 2)
    assert [d.hook for d in in_forward_order(dicts)] == list(HOOKS)
