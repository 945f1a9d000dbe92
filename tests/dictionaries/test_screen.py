"""The bfloat16 screen of wide encoders (``dictionaries.screen``) finds exactly the latents the dense encoder fires,
with the same values up to the order of the sums, for every activation and normalisation, in float32 and float64."""

from __future__ import annotations

import pytest
import torch

from atpstar.dictionaries import screen
from atpstar.dictionaries.dictionary import Dictionary


def sparse_dictionary(activation: str, dtype: torch.dtype, normalize: str = "none", seed: int = 0) -> Dictionary:
    """A 2048-wide dictionary on d_in 64 whose latents fire on ~1 % of random inputs."""
    gen = torch.Generator().manual_seed(seed)
    d_in, d_sae = 64, 2048
    w_enc = torch.randn(d_in, d_sae, generator=gen, dtype=dtype) / d_in**0.5
    b_enc = 0.1 * torch.randn(d_sae, generator=gen, dtype=dtype)
    threshold = None
    if activation == "jumprelu":
        threshold = 2.3 + 0.2 * torch.rand(d_sae, generator=gen, dtype=dtype)
    elif activation == "relu":
        b_enc = b_enc - 2.3  # ReLU SAEs are sparse through a negative bias
    return Dictionary(name="wide", hook="blocks.0.hook_resid_post", layer=0, W_enc=w_enc,
                      W_dec=torch.randn(d_sae, d_in, generator=gen, dtype=dtype), b_enc=b_enc,
                      b_dec=0.1 * torch.randn(d_in, generator=gen, dtype=dtype), activation=activation,
                      threshold=threshold, k=8 if activation == "topk" else None, apply_b_dec_to_input=True,
                      normalize_activations=normalize)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk"])
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale"])
def test_screen_matches_dense_encoder(activation, dtype, normalize, monkeypatch):
    monkeypatch.setattr(screen, "MIN_LATENTS", 0)
    monkeypatch.setattr(screen, "_cpu_has_bf16", lambda: True)  # any CPU computes bfloat16, if slowly
    d = sparse_dictionary(activation, dtype, normalize)
    x = torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(1), dtype=dtype)
    dense = d.encode(x)
    normed = d.normalise(x)[0] - d.b_dec
    assert screen._screened(d, normed.reshape(-1, 64)) is not None  # the screen ran (no dense fallback)
    screened = screen.encode_many(d, x)
    assert torch.equal(screened != 0, dense != 0)
    assert 0 < int((dense != 0).sum()) < 0.05 * dense.numel()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(screened, dense, rtol=tol, atol=tol)


def test_screen_falls_back_on_dense_dictionaries(monkeypatch):
    monkeypatch.setattr(screen, "MIN_LATENTS", 0)
    monkeypatch.setattr(screen, "_cpu_has_bf16", lambda: True)
    d = sparse_dictionary("relu", torch.float64)
    d.b_enc = torch.zeros_like(d.b_enc)  # half the latents on: the screen gives way to the dense product
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert screen._screened(d, x - d.b_dec) is None
    torch.testing.assert_close(screen.encode_many(d, x), d.encode(x), rtol=0, atol=0)


def test_narrow_dictionaries_are_not_screened():
    d = sparse_dictionary("jumprelu", torch.float32)
    assert not screen.screens(d, torch.zeros(2, 64))  # 2048 < MIN_LATENTS
