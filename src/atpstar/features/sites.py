"""Where a dictionary sits in a forward pass, in run sites (``runner.SITES``), and its decoder rows.

The run site of a dictionary's hook comes from ``dictionaries.sites.run_site`` (``blocks.6.hook_resid_post``
is layer 7's ``resid_pre``). Feature circuits need dictionaries whose latents write where they read (SAEs);
a transcoder (reads the MLP's input, writes its output) is refused with that reason.

Shape letters: S latents, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..dictionaries.sites import run_site
from ..errors import InputError
from ..runner import SITES


@dataclass(frozen=True)
class Placement:
    """The run site a dictionary reads and writes.

    Attributes:
        layer: the run layer of the site (``resid_post`` L is layer L + 1's ``resid_pre``).
        site: the run site name.
    """

    layer: int
    site: str

    @property
    def key(self) -> tuple[int, str]:
        """What a run's patch function receives: (layer, site)."""
        return (self.layer, self.site)

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: the order in which a forward pass reaches the site."""
        return (self.layer, SITES.index(self.site))


def placement(dictionary: Any) -> Placement:
    """The run site a dictionary reads and writes; a transcoder is refused."""
    name = getattr(dictionary, "name", dictionary)
    if getattr(dictionary, "transcoder", False):
        raise InputError(
            f"dictionary {name!r} is a transcoder (it reads {dictionary.hook}, writes {dictionary.write_hook}); "
            "feature circuits take SAEs, whose latents write where they read"
        )
    site = run_site(str(getattr(dictionary, "hook", "")))
    return Placement(site.layer, site.site)


def decoder_rows(dictionary: Any) -> torch.Tensor:
    """[S, D] what one unit of each latent adds at the site (``W_dec``, however the dictionary stores it)."""
    rows = getattr(dictionary, "W_dec", None)
    if rows is None:
        rows = getattr(dictionary, "decoder", None)
    if not isinstance(rows, torch.Tensor):
        raise InputError(f"dictionary {getattr(dictionary, 'name', dictionary)!r} has no decoder matrix W_dec [S, D]")
    return rows


def latent_change(dictionary: Any, site_x: torch.Tensor, latent: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """What changing latent ``latent`` [B] by ``amount`` [B] adds at the site, read at site_x [B, D]: [B, D]."""
    scale = dictionary.decoder_scale(site_x) if hasattr(dictionary, "decoder_scale") else 1.0  # [B, 1]
    return amount[:, None].to(site_x.dtype) * scale * decoder_rows(dictionary)[latent].to(site_x.dtype)
