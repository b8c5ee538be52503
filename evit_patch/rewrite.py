"""Insert a :class:`TokenReorganizer` at a located site: the only place graphs are edited."""

from __future__ import annotations

import torch.fx as fx

from .locate import BlockSite
from .reorganizer import TokenReorganizer

REORGANIZER_NAME = "evit"
"""Submodule name of the inserted module inside a patched block (``blocks.3.evit``)."""


def insert_reorganizer(gm: fx.GraphModule, site: BlockSite, reorganizer: TokenReorganizer) -> fx.GraphModule:
    """Route the residual stream through ``reorganizer`` between attention and MLP.

    Requires: ``site`` was located in ``gm``. Ensures: every former user of the attention
    residual add (the MLP's norm, the second residual add) reads the reorganized tokens.
    """
    gm.add_submodule(REORGANIZER_NAME, reorganizer)
    graph = gm.graph
    with graph.inserting_after(site.residual_add):
        node = graph.call_module(REORGANIZER_NAME, (site.residual_add, *site.score_inputs))
    site.residual_add.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    graph.lint()
    gm.recompile()
    return gm
