"""Where a dictionary reads and writes: TransformerLens hook names mapped onto the backend's run sites.

| hook (``blocks.{l}.``)            | run site (layer)   | note                                             |
|-----------------------------------|--------------------|--------------------------------------------------|
| ``hook_resid_pre``                | resid_pre (l)      | the residual stream entering layer l             |
| ``hook_resid_post``               | resid_pre (l + 1)  | not for the last layer (no run site after it)    |
| ``hook_resid_mid``                | resid_mid (l)      | sequential blocks only                           |
| ``hook_attn_out``                 | attn_out (l)       |                                                  |
| ``hook_mlp_in``                   | mlp_in (l)         | the stream as the MLP reads it, before its norm   |
| ``hook_mlp_out``, ``mlp.hook_out``| mlp_out (l)        |                                                  |

A transcoder reads its input hook and writes its output hook (the MLP's output). ``check_fits`` refuses a
dictionary whose width or hook does not fit a model, naming both sizes and the site.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

_SUFFIXES: dict[str, tuple[str, int]] = {
    "hook_resid_pre": ("resid_pre", 0),
    "hook_resid_post": ("resid_pre", 1),
    "hook_resid_mid": ("resid_mid", 0),
    "hook_attn_out": ("attn_out", 0),
    "hook_mlp_in": ("mlp_in", 0),
    "hook_mlp_out": ("mlp_out", 0),
    "mlp.hook_out": ("mlp_out", 0),
}
HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Gemma Scope 2 folder kinds -> the hook suffix they read (a transcoder reads the MLP input, writes its output)
RELEASE_KINDS = {"resid_post": "hook_resid_post", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
                 "transcoder": "hook_mlp_in", "resid_pre": "hook_resid_pre"}  # fmt: skip


@dataclass(frozen=True)
class Site:
    """A run site of one layer (``runner.SITES``; ``resid_pre`` of layer L is the final stream)."""

    site: str
    layer: int


def hook_name(layer: int, suffix: str) -> str:
    return f"blocks.{layer}.{suffix}"


def parse_hook(hook: str) -> tuple[int, str]:
    """(layer, suffix) of ``blocks.{l}.{suffix}``; an unknown hook is an error listing the known ones."""
    match = HOOK_PATTERN.match(hook or "")
    if match is None or match.group(2) not in _SUFFIXES:
        raise InputError(
            f"unknown dictionary hook {hook!r}; atpstar reads blocks.{{layer}}.<hook> with hook one of "
            f"{sorted(_SUFFIXES)} (give site=/layer= to load_dictionary if the files name it otherwise)"
        )
    return int(match.group(1)), match.group(2)


def run_site(hook: str) -> Site:
    """The run site a TransformerLens hook name maps onto."""
    layer, suffix = parse_hook(hook)
    site, shift = _SUFFIXES[suffix]
    return Site(site, layer + shift)


def check_fits(dictionary: Any, model: Any) -> None:
    """Refuse a dictionary whose hooks the model lacks or whose width is not the model's at that site.

    Raises:
        InputError: naming the dictionary, the site, its d_in and the model's width there.
    """
    for hook in dict.fromkeys((dictionary.hook, dictionary.write_hook)):
        layer, suffix = parse_hook(hook)
        site = run_site(hook)
        if not 0 <= layer < model.n_layers:
            raise InputError(
                f"dictionary {dictionary.name!r} reads {hook}, but the model has layers 0..{model.n_layers - 1}; "
                "load the dictionary made for this model"
            )
        if site.layer >= model.n_layers:
            raise InputError(
                f"dictionary {dictionary.name!r} sits at {hook}, the final residual stream, which has no run site "
                "to patch at; use a dictionary of an earlier layer"
            )
        if site.site == "resid_mid" and model.parallel_residual:
            raise InputError(
                f"dictionary {dictionary.name!r} reads {hook}, but {model.model_id!r} has parallel blocks (no "
                "resid_mid); use a dictionary of resid_pre/resid_post, attn_out or mlp_out"
            )
    if dictionary.d_in != model.d_model or dictionary.W_dec.shape[1] != model.d_model:
        raise InputError(
            f"dictionary {dictionary.name!r} has d_in {dictionary.d_in} (decoder width {dictionary.W_dec.shape[1]}) "
            f"but site {dictionary.hook} of {model.model_id!r} has width d_model={model.d_model}; load the "
            "dictionary made for this model"
        )
