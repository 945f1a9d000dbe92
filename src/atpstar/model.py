"""The wrapped model: sizes, tokenizer, and layer-by-layer forward passes with a ``Run``.

``Model`` is the backend: everything else in the package reaches a model through the members below
and through the run sites (``runner.SITES``), never through its modules. A TransformerLens or nnsight
model would implement the same members (its hook points mapped onto the same sites).

- Description: ``sizes`` (``n_layers``, ``n_heads``, ``n_kv_heads``, ``d_head``, ``d_mlp``, ``d_model``),
  ``model_id``, ``origin`` (where it was loaded from, or None), ``tokenizer``, ``dtype``, ``device``,
  ``output_device``, ``layer_device(layer)``, ``attention_args`` (per layer ``LayerAttention``),
  ``logit_softcap``, ``parallel_residual`` and ``post_norm`` (the block layout).
- Passes: ``check_ready(tokens)``, ``embed(tokens)``, ``run_layers(hidden, run)``, ``unembed(hidden)``,
  ``logits(tokens)``. ``run_layers`` hands every site of every layer it computes to ``run.site``, in
  this order: ``resid_pre``, q, k, v, pattern, z, ``attn_proj``, ``attn_out``, ``resid_mid`` (sequential
  blocks), ``mlp_in``, neuron, ``mlp_out``; and after the last layer ``resid_pre`` at index ``n_layers``.
- Per-layer helpers (edges): ``layer_qkv(layer, hidden)``, ``head_out_weights()``, ``qkv_share()``.
- ``hf_model``: the ``torch.nn.Module`` holding the weights (fingerprints, memory plans and checks read
  its parameters and config).

Shape letters: B batch, T positions (T' = T - start_pos), H heads, K kv-heads, E d_head, D d_model, V vocabulary.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .devices import check_weights_loaded, execution_device
from .errors import InputError
from .families import Family, LayerAttention, embed, family_of, get_path, layer_attention
from .model_hooks import LayerParts, layer_parts, site_hooks
from .ops import upcast
from .origin import Origin
from .runner import ACTIVE_RUN, Run, atpstar_attention

ATTN_IMPLEMENTATION = "atpstar"


@dataclass(frozen=True)
class Sizes:
    """Model sizes that fix every node layout."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_model: int

    @classmethod
    def of_config(cls, config: Any) -> Sizes:
        """The sizes a ``transformers`` config declares (GPT-2's and Llama's field names alike)."""
        n_heads = int(config.num_attention_heads)
        d_model = int(config.hidden_size)
        d_head = int(getattr(config, "head_dim", None) or d_model // n_heads)
        d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d_model
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        return cls(int(config.num_hidden_layers), n_heads, int(n_kv), d_head, int(d_mlp), d_model)


class Model:
    """A ``transformers`` causal LM prepared for patching and attribution.

    Attributes:
        hf_model: the underlying ``transformers`` model (never copied).
        tokenizer: its tokenizer, or None.
        model_id: a name for reports (hub id, folder or class name).
        origin: where ``load_model`` loaded it from (None for a model handed over as an object).
        n_layers, n_heads, n_kv_heads, d_head, d_mlp, d_model: sizes.
        parallel_residual: attention and MLP of a layer read the same residual stream (no ``resid_mid``).
        post_norm: attention and MLP outputs pass a norm before the residual stream (``attn_out`` is
            norm(``attn_proj``); Gemma-2/3, OLMo-2).

    Example:
        >>> import atpstar
        >>> model = atpstar.load_model("toy-ioi")
        >>> model.sizes
        Sizes(n_layers=2, n_heads=4, n_kv_heads=4, d_head=32, d_mlp=512, d_model=128)
        >>> model.tokenizer.decode([2])
        '<bos>'
    """

    def __init__(
        self, hf_model: Any, tokenizer: Any = None, model_id: str | None = None, origin: Origin | None = None
    ) -> None:
        if not isinstance(hf_model, torch.nn.Module) or not hasattr(hf_model, "config"):
            raise InputError(
                f"expected a transformers causal LM (torch.nn.Module with .config); got {type(hf_model).__name__}"
            )
        self.family: Family = family_of(hf_model)
        if hf_model.training:
            hf_model.eval()
            warnings.warn(
                "atpstar: the model was in training mode; switched it to eval mode (dropout off)", stacklevel=3
            )
        self.hf_model: Any = hf_model
        self.tokenizer = tokenizer
        self.model_id = model_id or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        self.origin = origin
        self.sizes: Sizes = Sizes.of_config(hf_model.config)
        family = self.family
        base = get_path(hf_model, family.base, family, "base")
        self._layers = list(get_path(base, family.layers, family, "layers"))
        self._final_norm = get_path(base, family.final_norm, family, "final_norm")
        self._rotary = get_path(base, family.rotary, family, "rotary") if family.rotary else None
        get_path(base, family.token_embed, family, "token_embed")
        # GPT-NeoX reads use_parallel_residual from its config; its family row says whether it may.
        parallel = family.parallel_residual and bool(getattr(hf_model.config, "use_parallel_residual", True))
        self.parallel_residual: bool = parallel
        self.post_norm: bool = family.attn_post_norm is not None
        self._parts: list[LayerParts] = [layer_parts(family, layer, parallel) for layer in self._layers]
        # What each layer's attention computes (window, soft-cap, scaling, rotary table), checked on every call.
        self.attention_args: tuple[LayerAttention, ...] = tuple(
            layer_attention(family, hf_model.config, parts.attention, i) for i, parts in enumerate(self._parts)
        )
        cap = getattr(hf_model.config, family.logit_softcap, None) if family.logit_softcap else None
        self.logit_softcap: float | None = float(cap) if cap else None
        # The attention function is handed the module; this finds its layer.
        self._layer_of_attention = {id(parts.attention): layer for layer, parts in enumerate(self._parts)}
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, atpstar_attention)

    # Sizes -----------------------------------------------------------------------------------
    n_layers = property(lambda self: self.sizes.n_layers)
    n_heads = property(lambda self: self.sizes.n_heads)
    n_kv_heads = property(lambda self: self.sizes.n_kv_heads)
    d_head = property(lambda self: self.sizes.d_head)
    d_mlp = property(lambda self: self.sizes.d_mlp)
    d_model = property(lambda self: self.sizes.d_model)

    @property
    def layer_modules(self) -> list[torch.nn.Module]:
        """The decoder layers, in order (for module hooks in brute-force test references; do not modify)."""
        return list(self._layers)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where token ids go in: the input embedding's (execution) device."""
        return execution_device(self.hf_model.get_input_embeddings())

    def layer_device(self, layer: int) -> torch.device:
        """Where layer ``layer`` computes (differs per layer for models dispatched with ``device_map``)."""
        return execution_device(self._layers[layer])

    @property
    def output_device(self) -> torch.device:
        """Where the logits are computed: the unembedding's (execution) device."""
        return execution_device(self.hf_model.get_output_embeddings())

    def __repr__(self) -> str:
        s = self.sizes
        return (
            f"Model({self.model_id!r}, family={self.family.name}, layers={s.n_layers}, heads={s.n_heads}, "
            f"kv_heads={s.n_kv_heads}, d_head={s.d_head}, d_mlp={s.d_mlp}, dtype={self.dtype})"
        )

    # Checks ----------------------------------------------------------------------------------
    def check_ready(self, tokens: torch.Tensor) -> None:
        """Refuse a model in training mode, weights that were never loaded, or token ids it cannot embed."""
        if self.hf_model.training:
            raise InputError(
                "the model is in training mode (dropout makes patching effects noise); call model.hf_model.eval()"
            )
        check_weights_loaded(self.hf_model)
        vocab = self.hf_model.get_input_embeddings().num_embeddings
        if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
            raise InputError(
                f"token ids must lie in [0, {vocab}); got range [{int(tokens.min())}, {int(tokens.max())}]"
            )
        max_pos = getattr(self.hf_model.config, "max_position_embeddings", None) or getattr(
            self.hf_model.config, "n_positions", None
        )
        if max_pos is not None and tokens.shape[-1] > max_pos:
            raise InputError(f"prompts have {tokens.shape[-1]} tokens; the model takes at most {max_pos}")

    # Forward passes --------------------------------------------------------------------------
    @contextmanager
    def engaged(self, run: Run) -> Iterator[dict[int, torch.Tensor]]:
        """Route attention and the module sites through ``run``; restore everything afterwards, also on error.

        Yields the per-layer change a patch made to ``resid_mid`` ([B, T', D]), which the layer's output
        still lacks (the layer adds its MLP write to the residual it saved before the patch).
        """
        config: Any = self.hf_model.config
        saved_impl = config._attn_implementation
        saved_grad = [p.requires_grad for p in self.hf_model.parameters()]
        shifts: dict[int, torch.Tensor] = {}
        handles = []
        token = ACTIVE_RUN.set((run, self._layer_of_attention, self.attention_args))
        try:
            config._attn_implementation = ATTN_IMPLEMENTATION
            for p in self.hf_model.parameters():
                p.requires_grad_(False)  # no parameter gradients, and autograd saves less
            handles = site_hooks(self._parts, run, shifts)
            yield shifts
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in zip(self.hf_model.parameters(), saved_grad):
                # accelerate re-creates offloaded (meta) parameters at each call, as inference tensors
                # when the call ran under inference_mode; those accept the flag only inside it.
                with torch.inference_mode(p.is_inference()):
                    p.requires_grad_(flag)
            config._attn_implementation = saved_impl
            ACTIVE_RUN.reset(token)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Residual stream entering layer 0: tokens [B, T] -> [B, T, D]."""
        return embed(self.family, self.hf_model, tokens.to(self.device))

    def run_layers(self, hidden: torch.Tensor, run: Run) -> torch.Tensor:
        """Run layers ``run.start_layer``.. on hidden [B, T', D] at positions ``run.start_pos``..; -> [B, T', D]."""
        n_pos = hidden.shape[1]
        position_ids = torch.arange(run.start_pos, run.start_pos + n_pos, device=hidden.device)[None]
        kwargs: dict[str, Any] = {"attention_mask": None}
        rotary_tables: dict[str | None, Any] = {}
        if self._rotary is not None:
            kwargs["position_ids"] = position_ids
            for table in {args.rotary for args in self.attention_args[run.start_layer :]}:
                # Gemma-3 keeps one table per layer type (local and global bases); others have one.
                extra = () if table is None else (table,)
                rotary_tables[table] = self._rotary(hidden, position_ids, *extra)
        with self.engaged(run) as shifts:
            for layer in range(run.start_layer, self.n_layers):
                hidden = run.site(layer, "resid_pre", hidden)
                if self._rotary is not None:
                    kwargs["position_embeddings"] = rotary_tables[self.attention_args[layer].rotary]
                out = self._layers[layer](hidden, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
                if layer in shifts:  # a patched resid_mid reached the MLP; the stream gets the change too
                    hidden = hidden + shifts.pop(layer)
        return run.site(self.n_layers, "resid_pre", hidden)  # the final residual stream

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the final residual stream: [..., D] -> [..., V] (soft-capped where the family does;
        float32 for half-precision models: metrics and their differences need the digits)."""
        normed = self._final_norm(hidden)
        head = self.hf_model.get_output_embeddings()
        logits = upcast(head(normed.to(execution_device(head))))
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap  # Gemma's final-logit soft-cap
        return logits

    def logits(self, tokens: torch.Tensor, run: Run | None = None) -> torch.Tensor:
        """All-position logits of a full forward pass: tokens [B, T] -> [B, T, V] (for checks)."""
        run = run or Run(self.n_layers)
        return self.unembed(self.run_layers(self.embed(tokens), run))

    # Per-layer helpers (edges) ---------------------------------------------------------------
    def layer_qkv(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, E], k and v [B, K, T, E] (post-rotary) of ``layer`` for residual inputs hidden [B, T, D].

        Runs the layer's own norm, projections and rotary (QK-norm included), and stops before the
        attention itself.
        """
        found: dict[str, torch.Tensor] = {}

        def stop(at_layer: int, site: str, x: torch.Tensor, run: Run) -> torch.Tensor:
            if at_layer == layer and site in ("q", "k", "v"):
                found[site] = x
                if site == "v":
                    raise _Stop
            return x

        try:
            self.run_layers(hidden, Run(self.n_layers, patch=stop, start_layer=layer))
        except _Stop:
            pass
        return found["q"], found["k"], found["v"]

    def head_out_weights(self) -> list[torch.Tensor]:
        """Per layer W_O as [H, E, D]: what head h adds to ``attn_proj`` is z_h W_O[h] (bias excluded)."""
        sizes = self.sizes
        width = sizes.n_heads * sizes.d_head
        out = []
        with torch.no_grad():
            for parts in self._parts:
                eye = torch.eye(width, dtype=self.dtype, device=self.device)
                # Read off the projection itself: works for Linear and GPT-2's Conv1D alike.
                weight = parts.out_proj(eye) - parts.out_proj(torch.zeros_like(eye[:1]))  # [H*E, D]
                out.append(weight.view(sizes.n_heads, sizes.d_head, -1))  # [H, E, D]
        return out

    def qkv_share(self) -> float:
        """Fraction of a layer's weights in its q/k/v projections (the cost unit of one ``layer_qkv`` input)."""
        parts = self._parts[0]
        total = sum(p.numel() for p in self._layers[0].parameters())
        qkv = sum(p.numel() for p in parts.attention.parameters()) - sum(p.numel() for p in parts.out_proj.parameters())
        return qkv / max(total, 1)


class _Stop(Exception):
    """Ends a partial forward once the layer's q, k, v are known."""


def as_model(model: Any) -> Model:
    """Accept a ``Model`` or a raw ``transformers`` model."""
    if isinstance(model, Model):
        return model
    if isinstance(model, torch.nn.Module):
        return Model(model)
    raise InputError(
        f"expected an atpstar.Model or a transformers model; got {type(model).__name__} (use atpstar.load_model)"
    )
