"""What the rewrite will insert, decided before any graph is edited: a pure step.

From a validated plan, the model's family and its located blocks, :func:`wire` decides which
block gets which reorganizer, where the token state (positions and sizes, see ``token_state``)
starts and ends, and how the head reads it; it refuses what cannot be wired soundly. The rewrite
(:func:`~evit_patch.graph.rewrite.insert`) then only follows these decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import EViTConfig
from ..errors import InvalidPlanError, UnsupportedModelError
from ..families import Family, describe
from ..options import Pool, Score
from ..reductions import Reduction
from ..token_state import check_capacity
from .profile import TracedBlock
from .reorganizer import TokenReorganizer


@dataclass(frozen=True)
class BlockEdit:
    """What one block needs: a reorganizer, and whether token state flows in and out of it."""

    reorganizer: TokenReorganizer | None
    state_in: bool
    """Tokens may arrive reorganized, with positions and sizes packed in (see ``token_state``)."""
    state_out: bool
    """The block packs positions and sizes into its output."""
    channels: int
    num_prefix_tokens: int
    rotary_args: tuple[str, ...] = ()
    proportional: bool = False
    """Add ``log(size)`` to the attention logits."""

    sees_reduced: bool = False
    """At or after the first reorganizing block: it runs as traced, never the library's own code
    (which may hand it inputs built for every token, such as transformers' masks under export)."""
    weigh_out: bool = False
    """The last block of a model whose head averages its output directly (no per-token module in
    between): it scales the image tokens by their sizes, as the final norm does elsewhere."""

    prefix_only: bool = False
    """The last block of a model whose head reads only the prefix tokens: its MLP runs on them alone."""
    num_patches: int | None = None
    """``dense``: the tokens also carry which of the model's ``num_patches`` patches each stands for."""

    @property
    def changes_graph(self) -> bool:
        return self.reorganizer is not None or self.state_in or self.state_out or self.weigh_out or self.prefix_only


@dataclass(frozen=True)
class Wiring:
    """The rewrite's decisions for one model."""

    reduction: Reduction
    score: Score
    pool: Pool
    blocks: tuple[BlockEdit, ...]
    """One per traced block, in order."""
    final_norm: str | None
    """The per-token module after the last block where the state is split off (``None``: no state
    reaches the end of the blocks, or none exists and the last block drops it)."""
    final_edit: BlockEdit | None
    pool_module: str | None
    """An attention pool that reads the state (its qualified name), else ``None``."""
    pool_edit: BlockEdit | None


def wire(patched: nn.Module, family: Family, traced: list[TracedBlock], config: EViTConfig, score: Score) -> Wiring:
    """Decide the rewrite of ``patched`` (its blocks ``traced``) for ``config``; nothing is changed."""
    options = config.plan_options
    pool = Pool(family.pool(patched))
    reduction = options.reduction(pool)
    rates = dict(zip(config.layers, config.keep))
    rotary = family.rotary_args(patched)
    positional = bool(rotary) or any(t.site.bias is not None for t in traced)
    # Positions travel for position tables; sizes for proportional attention, for reductions that
    # weigh tokens by them, and for heads that average or attention-pool the tokens.
    dense = bool(config.dense)
    stateful = positional or pool is not Pool.TOKEN or options.proportional_attention or reduction.weighs_sizes or dense
    prefix, channels = family.num_prefix_tokens(patched), family.channels(patched)
    patches = family.num_tokens(patched) - prefix if dense else None
    if stateful:
        check_capacity(family.num_tokens(patched) - prefix, describe(patched))
    final = family.final_norm(patched) if stateful else None
    if final is not None and not _has_module(patched, final):
        raise UnsupportedModelError(
            f"{describe(patched)}: expected the final norm at {final!r} ({family.name}), found no such module"
        )
    # An average read straight off the last block (MAE's global_pool) is weighed by that block.
    weigh_last = stateful and final is None and pool is Pool.AVG
    if dense and weigh_last:
        raise UnsupportedModelError(
            f"{describe(patched)}: its head averages the last block's output directly, so that output is weighed "
            "by token sizes and cannot be restored to the patch grid; dense=True is not available for it"
        )
    first, last = min(config.layers), len(traced) - 1
    attention_pool = pool is Pool.ATTENTION
    if config.cls_only and (pool is not Pool.TOKEN or family.token_outputs(patched)):
        reads = (
            f"its head pools the image tokens ({pool.value})" if pool is not Pool.TOKEN else "it returns every token"
        )
        raise InvalidPlanError(
            f"{describe(patched)}: cls_only=True runs the last block's MLP on the class token(s) alone, exact "
            f"only for a head that reads nothing else, but {reads}; leave cls_only unset"
        )
    edits = []
    for index, block in enumerate(traced):
        reorganizer = None
        if index in rates:
            if reduction.needs_keys and block.site.keys is None:
                raise UnsupportedModelError(
                    f"{block.site.where}: method={options.method_name!r} compares the attention keys, but the "
                    "block's q @ k^T was not found; use method='evit'"
                )
            reorganizer = TokenReorganizer(
                rates[index],
                reduction=reduction,
                num_prefix_tokens=prefix,
                source=block.site.source,
                scale=block.site.scale,
                layer=index,
                score=score,
                stateful=stateful,
                keys_transposed=block.site.keys_transposed,
                dense=dense,
            )
        edit = BlockEdit(
            reorganizer,
            state_in=stateful and index > first,
            # Without a final norm the last block drops the state (nothing after it reads positions),
            # unless an attention pool reads the block's output directly (it splits the sizes off itself).
            state_out=stateful and index >= first and (final is not None or attention_pool or index < last),
            channels=channels,
            num_prefix_tokens=prefix,
            rotary_args=rotary,
            proportional=options.proportional_attention,
            sees_reduced=index >= first,
            weigh_out=weigh_last and index == last,
            prefix_only=config.cls_only and index == last,
            num_patches=patches,
        )
        edits.append(edit)
    state_edit = BlockEdit(
        None, state_in=True, state_out=False, channels=channels, num_prefix_tokens=prefix, num_patches=patches
    )
    pool_edit = None
    if attention_pool:
        pool_prefix = family.pool_prefix_tokens(patched)
        pool_edit = BlockEdit(None, state_in=True, state_out=False, channels=channels, num_prefix_tokens=pool_prefix)
    return Wiring(
        reduction,
        score,
        pool,
        tuple(edits),
        final,
        state_edit if final is not None else None,
        family.pool_module(patched) if attention_pool else None,
        pool_edit,
    )


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
