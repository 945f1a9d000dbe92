"""The QK fix on dictionary latents (Kramár et al. 2024 §4, applied to the attention downstream of a latent)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError


def qk_fixes(job: Any, step: Any, dictionaries: Any, diffs: Any) -> dict[str, torch.Tensor]:
    """Per dictionary, the QK-fix correction to the latents' AtP estimates [b, S, T]."""
    raise InputError("the QK fix on dictionary latents is not available yet; use atp or atp+graddrop on latents")
