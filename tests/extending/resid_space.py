"""A toy node space, as a contributor would add one: the residual stream entering each layer, per position.

Node (layer l, position t) is the whole vector resid_pre_l[t]; patching it replaces that vector with
the source run's, and AtP scores it (resid_src - resid_base)[t] · ∂L/∂resid_pre_l[t].
"""

from atpstar.nodes import NodeType
from atpstar.spaces import SiteNodes

RESID = NodeType("resid", ("layer", "pos"), None, "hook_resid_pre", "resid_pre", True, "")


class ResidNodes(SiteNodes):
    """The residual stream entering each layer, one node per (layer, position)."""

    kind = "resid"
    ROWS = {"resid": RESID}

