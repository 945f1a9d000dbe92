"""Reading dictionaries from the files their publishers ship.

- SAELens: a folder with ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae], ``W_dec``
  [d_sae, d_in], ``b_enc``, ``b_dec``, ``threshold`` (or training's ``log_threshold``) for JumpReLU).
  ``cfg.json`` keys read: ``d_in``, ``d_sae``, ``architecture`` (``standard``, ``jumprelu``, ``topk``), ``hook_name`` (top level, or in ``metadata`` since
  SAELens 6), ``activation_fn``/``activation_fn_str`` and ``activation_fn_kwargs.k`` or ``k`` (TopK),
  ``apply_b_dec_to_input`` (default true), ``normalize_activations``, ``neuronpedia_id``.
- Gemma Scope 2: ``params.safetensors`` with lower-case ``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``,
  ``threshold`` (JumpReLU); the site and layer from the caller or from the release's folders
  (``resid_post/layer_6_width_16k_l0_medium``; kinds ``resid_post``, ``attn_out``, ``mlp_out``, ``transcoder``).
- circuit-tracer transcoders: ``config.yaml`` (``feature_input_hook``, ``feature_output_hook``, ``transcoders``:
  ``{id, layer, filepath}``) and ``layer_{i}.safetensors`` with ``W_enc`` [d_sae, d_model], ``W_dec``
  [d_model, d_sae] (transposed on reading, as circuit-tracer's loader does), ``b_enc``, ``b_dec``, optional
  ``threshold`` (JumpReLU) and ``W_skip`` [d_model, d_model] (applied as x W_skipᵀ).

A hub id (``owner/repo`` or ``owner/repo/sub/folder``) is downloaded with ``huggingface_hub`` first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .dictionary import ACTIVATIONS, NORMALISATIONS, Dictionary
from .sites import RELEASE_KINDS, hook_name, parse_hook

SAELENS_WEIGHTS, SAELENS_CONFIG = "sae_weights.safetensors", "cfg.json"
GEMMA_SCOPE_PARAMS = "params.safetensors"
TRACER_CONFIG = "config.yaml"
_LAYER = re.compile(r"layer_(\d+)")


def load_dictionary(
    path_or_folder: str | Path,
    *,
    name: str | None = None,
    site: str | None = None,
    layer: int | None = None,
    dtype: torch.dtype | None = None,
) -> Dictionary:
    """Read an SAE or transcoder (SAELens, Gemma Scope 2 or circuit-tracer files; or a hub id).

    Args:
        path_or_folder: a folder or a weights file of one of the three formats, or a hub id.
        name: its node-type name (default: from the files; see ``atpstar.dictionaries``).
        site: where it reads, as a hook suffix or a Gemma Scope kind (``"resid_post"``, ``"attn_out"``,
            ``"mlp_out"``, ``"transcoder"``, ``"hook_resid_pre"``...), when the files do not say.
        layer: its layer, when the files do not say (for circuit-tracer: which layer's transcoder).
        dtype: cast the weights (default: as stored).

    Returns:
        The ``Dictionary``; ``attribute(..., dictionaries=[d])`` attaches it.

    Raises:
        InputError: no known format at the path, an unsupported architecture, or no site/layer.

    Example:
        >>> import tempfile, atpstar
        >>> from atpstar.testing.fixtures import write_saelens
        >>> model = atpstar.load_model("toy-ioi")
        >>> folder = write_saelens(tempfile.mkdtemp() + "/sae", "blocks.0.hook_resid_post", d_in=128, d_sae=64)
        >>> sae = atpstar.load_dictionary(folder, name="sae-64")
        >>> pairs = atpstar.tasks.ioi(model.tokenizer, 2, seed=0)
        >>> result = atpstar.attribute(model, pairs, "atp", nodes=["head"], dictionaries=[sae])
        >>> tuple(result.per_pair["sae-64"].shape), tuple(result.per_pair["sae-64.error"].shape)
        ((2, 64, 15), (2, 15))
    """
    path = Path(path_or_folder)
    if not path.exists():
        path = _download(str(path_or_folder))
    folder = path if path.is_dir() else path.parent
    if (folder / SAELENS_CONFIG).exists() and (folder / SAELENS_WEIGHTS).exists():
        found = _saelens(folder, site, layer)
    elif (folder / GEMMA_SCOPE_PARAMS).exists():
        found = _gemma_scope(folder, site, layer)
    elif (folder / TRACER_CONFIG).exists():
        named = _LAYER.search(path.name) if path.is_file() else None
        chosen = int(named.group(1)) if named else layer
        found = _circuit_tracer(folder, chosen)
    else:
        raise InputError(
            f"no dictionary found at {str(path)!r}: expected a SAELens folder ({SAELENS_CONFIG} + {SAELENS_WEIGHTS}), "
            f"a Gemma Scope 2 folder ({GEMMA_SCOPE_PARAMS}) or a circuit-tracer folder ({TRACER_CONFIG} + "
            "layer_{i}.safetensors)"
        )
    if name is not None:
        found.name = name
    check_name(found.name)
    if dtype is not None:
        for key, tensor in found.tensors().items():
            setattr(found, key, tensor.to(dtype))
    return found


def check_name(name: str) -> None:
    """A dictionary's name becomes a node type: non-empty, no brackets or commas, not ending in ``.error``."""
    if not name or any(c in name for c in "[],") or name.endswith(".error") or name != name.strip():
        raise InputError(f"bad dictionary name {name!r}: use a short label such as 'sae-16k' (no brackets, commas, "
                         "surrounding spaces or '.error' suffix); pass name= to load_dictionary")  # fmt: skip


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _hook_from(site: str | None, layer: int | None, fallback: str | None, where: Path) -> str:
    """The hook name from the caller's site/layer, else ``fallback`` (the files' own)."""
    if site is None and layer is None and fallback:
        return fallback
    if site is not None and site.startswith("blocks."):
        return site
    suffix = RELEASE_KINDS.get(site or "", site)
    if fallback and suffix is None:
        suffix = parse_hook(fallback)[1]
    if fallback and layer is None:
        layer = parse_hook(fallback)[0]
    if suffix is None or layer is None:
        raise InputError(f"the dictionary at {str(where)!r} does not say where it reads: pass site= and layer=")
    return hook_name(layer, suffix if suffix.startswith(("hook_", "mlp.")) else f"hook_{suffix}")


def _saelens(folder: Path, site: str | None, layer: int | None) -> Dictionary:
    cfg: dict[str, Any] = json.loads((folder / SAELENS_CONFIG).read_text())
    meta = cfg.get("metadata") or {}
    weights = _read_safetensors(folder / SAELENS_WEIGHTS)
    architecture = str(cfg.get("architecture", "standard"))
    fn = str(cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    activation = {"jumprelu": "jumprelu", "topk": "topk"}.get(architecture, "topk" if fn == "topk" else fn)
    if architecture not in ("standard", "jumprelu", "topk") or activation not in ACTIVATIONS:
        raise InputError(f"SAELens architecture {architecture!r} with activation {fn!r} is not supported; "
                         f"supported: standard (relu or topk), jumprelu, topk")  # fmt: skip
    k = int(cfg.get("k") or kwargs.get("k") or 0) or None
    if activation == "topk" and k is None:
        raise InputError(f"the TopK SAE at {str(folder)!r} does not say its k (cfg.json 'k' or activation_fn_kwargs.k)")
    norm = str(cfg.get("normalize_activations") or "none")
    if norm not in NORMALISATIONS:
        raise InputError(f"SAELens normalize_activations={norm!r} is not supported; supported: {list(NORMALISATIONS)} "
                         "(fold a constant scaling factor into the weights first)")  # fmt: skip
    hook = _hook_from(site, layer, cfg.get("hook_name") or meta.get("hook_name"), folder)
    return Dictionary(
        name=folder.name, hook=hook, layer=parse_hook(hook)[0],
        W_enc=weights["W_enc"], W_dec=weights["W_dec"], b_enc=weights["b_enc"], b_dec=weights["b_dec"],
        activation=activation, k=k,
        threshold=weights["log_threshold"].exp() if "log_threshold" in weights else weights.get("threshold"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), normalize_activations=norm,
        format="saelens", source=str(folder), neuronpedia_id=cfg.get("neuronpedia_id") or meta.get("neuronpedia_id"),
    )  # fmt: skip


def _gemma_scope(folder: Path, site: str | None, layer: int | None) -> Dictionary:
    weights = _read_safetensors(folder / GEMMA_SCOPE_PARAMS)
    kind = site or next((part for part in reversed(folder.parts) if part in RELEASE_KINDS), None)
    found = _LAYER.search(folder.name)
    layer = layer if layer is not None else (int(found.group(1)) if found else None)
    if kind is None or layer is None:
        raise InputError(f"cannot tell the site/layer of the Gemma Scope dictionary at {str(folder)!r} from its folders "
                         f"(kinds {sorted(RELEASE_KINDS)}, 'layer_<L>_width_...'): pass site= and layer=")  # fmt: skip
    hook = _hook_from(kind, layer, None, folder)
    transcoder = kind == "transcoder"
    return Dictionary(
        name=f"{kind}-{folder.name}", hook=hook, layer=layer,
        W_enc=weights["w_enc"], W_dec=weights["w_dec"], b_enc=weights["b_enc"], b_dec=weights["b_dec"],
        activation="jumprelu" if "threshold" in weights else "relu", threshold=weights.get("threshold"),
        W_skip=weights.get("w_skip"), output_hook=hook_name(layer, "hook_mlp_out") if transcoder else None,
        format="gemma_scope", source=str(folder),
    )  # fmt: skip


def _circuit_tracer(folder: Path, layer: int | None) -> Dictionary:
    import yaml

    config: dict[str, Any] = yaml.safe_load((folder / TRACER_CONFIG).read_text()) or {}
    entries = {int(t["layer"]): t for t in config.get("transcoders", [])}
    files = {int(_LAYER.search(p.name).group(1)): p for p in folder.glob("layer_*.safetensors")}  # type: ignore[union-attr]
    layers = sorted(set(entries) | set(files))
    if layer is None and len(layers) == 1:
        layer = layers[0]
    if layer is None or layer not in layers:
        raise InputError(f"the circuit-tracer folder {str(folder)!r} holds transcoders of layers {layers}: "
                         "pass layer= (or the layer_<i>.safetensors file)")  # fmt: skip
    entry = entries.get(layer, {})
    path = files.get(layer) or folder / str(entry.get("filepath", f"layer_{layer}.safetensors"))
    weights = _read_safetensors(path)
    read = _tracer_hook(str(config.get("feature_input_hook", "hook_resid_mid")), layer)
    write = _tracer_hook(str(config.get("feature_output_hook", "hook_mlp_out")), layer)
    skip = weights.get("W_skip")
    return Dictionary(
        name=str(entry.get("id") or f"{folder.name}-layer{layer}"), hook=read, layer=layer,
        W_enc=weights["W_enc"].T.contiguous(), W_dec=weights["W_dec"].T.contiguous(),  # [D, S], [S, D]
        b_enc=weights["b_enc"], b_dec=weights["b_dec"],
        activation="jumprelu" if "threshold" in weights else "relu", threshold=weights.get("threshold"),
        apply_b_dec_to_input=False, W_skip=None if skip is None else skip.T.contiguous(), output_hook=write,
        format="circuit_tracer", source=str(path),
    )  # fmt: skip


def _tracer_hook(hook: str, layer: int) -> str:
    """A circuit-tracer hook (``hook_resid_mid``, ``blocks.{layer}.hook_mlp_out``...) as a full hook name."""
    hook = hook.replace("{layer}", str(layer))
    full = hook if hook.startswith("blocks.") else hook_name(layer, hook)
    parse_hook(full)  # refuses hooks with no run site (e.g. ln2.hook_normalized, the MLP's normalised input)
    return full


def _download(hub_id: str) -> Path:
    """A hub id ``owner/repo[/sub/folder]`` downloaded with huggingface_hub: the local folder."""
    parts = hub_id.strip("/").split("/")
    if len(parts) < 2:
        raise InputError(f"{hub_id!r} is neither a file, a folder nor a hub id (owner/repo[/folder])")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as err:  # network, authentication or a missing repository: one clear message
        raise InputError(f"could not download dictionary {hub_id!r} from the Hugging Face hub ({err}); "
                         "download it yourself and pass the local folder") from err  # fmt: skip
    return Path(local) / sub
