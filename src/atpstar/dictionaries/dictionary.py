"""``Dictionary``: a sparse autoencoder or transcoder, as atpstar computes with it.

A dictionary reads an activation x [.., d_in] at one site and writes a reconstruction at a site (the same
one for an SAE; the MLP output for a transcoder):

    pre   = (norm(x) - b_dec · apply_b_dec_to_input) W_enc + b_enc             [.., d_sae]
    f     = relu(pre) | pre · [pre > threshold] (JumpReLU) | top-k of relu(pre) (TopK)
    write = ((f W_dec + b_dec) · scale(x) + shift(x)) + x W_skip                [.., d_in]
    error = y - write        (y: the activation at the write site; x itself for an SAE)

``norm`` is SAELens' ``normalize_activations`` (``none``; ``constant_norm_rescale``: x · sqrt(d_in) / |x|;
``layer_norm``), undone on the way out by ``scale``/``shift``. The latents f and the error are the nodes
(Marks et al. 2024, Sparse Feature Circuits): y = write + error exactly, so attaching a dictionary changes
nothing, and patching latent i at position t adds Δf_i · scale(x_t) · W_dec[i] to y_t.

Shape letters: S d_sae, D d_in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

ACTIVATIONS = ("relu", "jumprelu", "topk")
NORMALISATIONS = ("none", "constant_norm_rescale", "layer_norm")


@dataclass(eq=False)
class Dictionary:
    """A loaded SAE or transcoder (``atpstar.load_dictionary``).

    Example:
        >>> import tempfile, atpstar
        >>> from atpstar.testing.fixtures import write_saelens
        >>> folder = write_saelens(tempfile.mkdtemp() + "/sae", "blocks.0.hook_resid_post", d_in=128, d_sae=64)
        >>> sae = atpstar.load_dictionary(folder, name="sae-64")
        >>> sae.name, sae.hook, sae.d_in, sae.d_sae, sae.activation
        ('sae-64', 'blocks.0.hook_resid_post', 128, 64, 'relu')

    Attributes:
        name: its node-type name (e.g. ``"sae-16k"``); latent nodes are named ``{hook}/{name}[latent i, pos t]``.
        hook: the TransformerLens hook it reads, e.g. ``"blocks.6.hook_resid_post"``.
        layer: the layer of ``hook``.
        W_enc: [D, S]; W_dec: [S, D]; b_enc: [S]; b_dec: [D].
        activation: ``"relu"``, ``"jumprelu"`` (with ``threshold`` [S]) or ``"topk"`` (with ``k``).
        apply_b_dec_to_input: subtract b_dec from the input before encoding (SAELens).
        normalize_activations: ``"none"``, ``"constant_norm_rescale"`` or ``"layer_norm"`` (SAELens' names).
        W_skip: [D, D] a transcoder's linear skip (its output gets x W_skip), or None.
        output_hook: the hook a transcoder writes (its MLP output); None for an SAE (it writes ``hook``).
        format: ``"saelens"``, ``"gemma_scope"`` or ``"circuit_tracer"``; source: where it was read from.
        neuronpedia_id: the id Neuronpedia lists it under, when its files say.
    """

    name: str
    hook: str
    layer: int
    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    activation: str = "relu"
    threshold: torch.Tensor | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    W_skip: torch.Tensor | None = None
    output_hook: str | None = None
    format: str = ""
    source: str = ""
    neuronpedia_id: str | None = None
    _hash: str = field(default="", repr=False)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # derived weights (``dictionaries.screen``)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def id(self) -> str:
        """The dictionary's id in tables: its Neuronpedia id when known, else its name."""
        return self.neuronpedia_id or self.name

    @property
    def site(self) -> str:
        """Where it reads, as the hook's short name: ``resid_post``, ``resid_pre``, ``resid_mid``, ``attn_out``,
        ``mlp_in`` or ``mlp_out`` (a transcoder reads ``mlp_in`` or ``resid_mid`` and writes ``output_hook``)."""
        return self.hook.split(".", 2)[2].replace("mlp.hook_out", "mlp_out").removeprefix("hook_")

    @property
    def transcoder(self) -> bool:
        return self.output_hook is not None

    @property
    def write_hook(self) -> str:
        return self.output_hook or self.hook

    @property
    def content_hash(self) -> str:
        """SHA-256 (16 hex digits) of the weights and every setting that changes f or the write."""
        if not self._hash:
            digest = hashlib.sha256()
            settings = (self.hook, self.output_hook, self.activation, self.k, self.apply_b_dec_to_input,
                        self.normalize_activations)  # fmt: skip
            digest.update(repr(settings).encode())
            for key, tensor in self.tensors().items():
                values = tensor.detach().to(torch.float32).cpu().contiguous()
                digest.update(f"{key}:{tuple(values.shape)};".encode())
                digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())  # [numel * 4] raw bytes
            self._hash = digest.hexdigest()[:16]
        return self._hash

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights by SAELens name (``threshold`` and ``W_skip`` when present)."""
        out = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip
        return out

    def describe(self) -> dict[str, Any]:
        """What a saved result keeps to name and lay out this dictionary's nodes without its weights."""
        return {
            "name": self.name, "id": self.id, "hook": self.hook, "output_hook": self.output_hook,
            "layer": self.layer, "d_in": self.d_in, "d_sae": self.d_sae, "activation": self.activation,
            "format": self.format, "source": self.source, "content_hash": self.content_hash,
        }  # fmt: skip

    # Computation ------------------------------------------------------------------------------
    def _weights(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.to(like.device, like.dtype) for k, v in self.tensors().items()}

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(norm(x), scale, shift): x [.., D] as the encoder sees it; the write is (...)·scale + shift ([.., 1] each)."""
        one, zero = torch.ones_like(x[..., :1]), torch.zeros_like(x[..., :1])
        if self.normalize_activations == "constant_norm_rescale":
            scale = x.norm(dim=-1, keepdim=True) / self.d_in**0.5  # [.., 1]
            return x / scale, scale, zero
        if self.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)
            return (x - mu) / (std + 1e-5), std, mu
        return x, one, zero

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations f [.., S] of inputs x [.., D]."""
        w = self._weights(x)
        normed, _, _ = self.normalise(x)
        if self.apply_b_dec_to_input:
            normed = normed - w["b_dec"]
        pre = normed @ w["W_enc"] + w["b_enc"]  # [.., S]
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > w["threshold"])
        if self.activation == "topk":
            top = torch.topk(pre, int(self.k or 1), dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def write(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction [.., D] of latents f [.., S] read from inputs x [.., D]."""
        w = self._weights(x)
        _, scale, shift = self.normalise(x)
        out = (f @ w["W_dec"] + w["b_dec"]) * scale + shift
        if self.W_skip is not None:
            out = out + x @ w["W_skip"]
        return out

    def error(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The reconstruction error y - write(f(x), x) [.., D] (y: the activation at the write site)."""
        return y - self.write(self.encode(x), x)

    def decoder_scale(self, x: torch.Tensor) -> torch.Tensor:
        """[.., 1] how much of W_dec[i] one unit of latent i adds at the write site (1 without normalisation)."""
        return self.normalise(x)[1]
