"""Attribution methods; importing this package fills ``METHODS``."""

from . import atp, blocks, hierarchical, patching, subsampling  # noqa: F401  (registration)
from .base import METHODS, Method, build_method

__all__ = ["METHODS", "Method", "build_method"]
