"""Attribution methods; importing this package fills ``METHODS``."""

from . import patching, atp, ig, subsampling, blocks, hierarchical  # noqa: F401, I001  (registration, in listing order)
from .base import METHODS, Method, build_method

__all__ = ["METHODS", "Method", "build_method"]
