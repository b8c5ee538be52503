"""What a reduction method is: it decides, once per reorganizing block, how the leaving tokens are
made from the entering ones (a :class:`Mix`); everything else is derived from that decision.

A method writes one thing, :meth:`Reduction.select`. The tokens themselves (:func:`mix_tokens`),
their sizes and original positions (:func:`follow`), the exact mixing matrix that tracking and
visualisation read (:func:`mixing`), the survivor count that costs, plans and ``explain`` read
(:meth:`Reduction.tokens_after`) all come from the :class:`Mix` or the method's declarations, so
they cannot disagree (``tests/test_reductions.py`` checks every registered method against them).

Notation: ``B`` batch, ``N`` tokens (prefix included), ``P`` prefix tokens (always first, never
reduced), ``M = N - P`` entering image tokens, ``k`` kept (leading) tokens, ``C`` channels.
"""

from __future__ import annotations

import abc
import math
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PlanOptions
    from ..options import Pool


def num_kept(num_image_tokens: int, keep: float) -> int:
    """Image tokens a block keeps: ``ceil(keep * (N - P))``, as the official EViT code computes it.

    Depends on the token count alone (no tensor values), so ``torch.compile`` and export see
    a static shape.
    """
    return math.ceil(keep * num_image_tokens)


def drops(num_image_tokens: int, keep: float | None) -> bool:
    """Whether a block reorganizing at ``keep`` (``None``: it does not) drops any token: the one
    answer the reorganizer, the cost model and training read. Keeping every token is an exact no-op."""
    return keep is not None and num_kept(num_image_tokens, keep) < num_image_tokens


class Mix(NamedTuple):
    """How one reorganization made its leaving image tokens from the ``M`` entering ones.

    Leaving token ``i < k`` is led by entering token ``kept[:, i]`` (it keeps that token's original
    position); ``moved`` tokens join the kept token ``into`` names; an optional *rest* token (EViT's
    fused token, last, with no position) sums every entering token that is neither kept nor moved;
    any other entering token is dropped. Each leaving token is the weighted sum of its members, or
    with ``mean`` their weighted mean. Entering tokens are indexed ``0..M-1`` after the prefix.
    """

    kept: Tensor
    """``(B, k)`` entering tokens that lead leaving tokens ``0..k-1``, in that order."""
    moved: Tensor | None = None
    """``(B, m)`` entering tokens that join a kept token."""
    into: Tensor | None = None
    """``(B, m)`` the leaving token (``0..k-1``) each moved token joins."""
    weight: Tensor | None = None
    """``(B, M)`` each entering token's weight in the kept token it leads or joins; ``None``: 1.
    Indexed by entering token, not by role: merging methods pass the tokens' sizes as they are."""
    rest: Tensor | None = None
    """``(B, M)`` weights of the rest token over all entering tokens (zero on kept and moved ones)."""
    mean: bool = False
    """Leaving tokens are weighted means (``sum w x / sum w``) rather than weighted sums."""

    @property
    def num_out(self) -> int:
        """Leaving image tokens."""
        return self.kept.shape[1] + int(self.rest is not None)


def rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` for ``(B, M, C)`` ``x`` and ``(B, k)`` ``index``, by one row copy (an
    index_select on the flattened batch is a memcpy per row, far faster on CPU than a gather with
    an index expanded over channels)."""
    batch, count, channels = x.shape
    return x.reshape(batch * count, channels).index_select(0, _flat(index, count)).view(*index.shape, channels)


def _flat(index: Tensor, count: int) -> Tensor:
    """``(B * n,)`` ``index`` (``(B, n)``, values below ``count``) into the batch flattened to ``B * count`` rows."""
    offsets = torch.arange(0, index.shape[0] * count, count, device=index.device)
    return (index + offsets.unsqueeze(1)).flatten()


def slots(mix: Mix, num_image: int) -> Tensor:
    """``(B, M)``: the kept token (``0..k-1``) each entering image token leads or joins, ``k`` for
    one that joins none (fused into the rest token, or dropped). One scatter: the index every
    derived quantity of a merging mix (:func:`mix_tokens`, :func:`follow`, :func:`follow_owner`)
    reads, so a reorganizing block builds it once."""
    kept = mix.kept
    batch, count = kept.shape
    lead = torch.arange(count, device=kept.device).expand(batch, count)
    joined = torch.full((batch, num_image), count, dtype=torch.long, device=kept.device).scatter(1, kept, lead)
    return joined if mix.moved is None else joined.scatter(1, mix.moved, mix.into)


def mix_tokens(x: Tensor, mix: Mix, num_prefix: int, joined: Tensor | None = None) -> Tensor:
    """``(B, P + mix.num_out, C)``: the prefix unchanged, then the leaving image tokens of ``mix``.

    Kept tokens alone are one row gather; with moved tokens, every entering token is added into its
    kept token by one ``index_add`` (its weight applied first), and a weighted mean divides by the
    weights' sums; the rest token is one ``bmm``. ``joined``: :func:`slots` of ``mix``, if the
    caller has it."""
    batch, _, channels = x.shape
    num_image, kept = x.shape[1] - num_prefix, mix.kept.shape[1]
    image = x[:, num_prefix:]
    weight = mix.weight
    if weight is not None and weight.dtype != x.dtype:  # each op costs microseconds at batch 1
        weight = weight.to(x.dtype)
    if mix.moved is None:
        prefix = torch.arange(num_prefix, device=x.device).expand(batch, num_prefix)
        out = rows(x, torch.cat([prefix, mix.kept + num_prefix], dim=1))
        if weight is not None and not mix.mean:  # a weighted mean of one token is the token
            out = out * F.pad(weight.gather(1, mix.kept), (num_prefix, 0), value=1.0).unsqueeze(-1)
    else:
        joined = slots(mix, num_image) if joined is None else joined
        spare = int(kept + mix.moved.shape[1] < num_image)  # a row for the tokens that join none
        width = kept + spare
        source = image if weight is None else image * weight.unsqueeze(-1)
        # One index_add on the flattened batch (ONNX: ScatterND with add, unlike scatter_reduce).
        out = x.new_zeros(batch * width, channels).index_add(0, _flat(joined, width), source.reshape(-1, channels))
        out = out.view(batch, width, channels)
        if spare:  # sliced before dividing: the spare row's zero total would send NaN gradients back
            out = out[:, :kept]
        if mix.mean:
            ones = x.new_ones(joined.shape) if weight is None else weight
            totals = ones.new_zeros(batch, width).scatter_add(1, joined, ones)
            out = out / (totals[:, :kept] if spare else totals).unsqueeze(-1)
        out = torch.cat([x[:, :num_prefix], out], dim=1)
    if mix.rest is None:
        return out
    rest = mix.rest.to(x.dtype)
    if mix.mean:
        rest = rest / rest.sum(dim=1, keepdim=True)
    return torch.cat([out, torch.bmm(rest.unsqueeze(1), image)], dim=1)


def follow(
    positions: Tensor | None, sizes: Tensor | None, mix: Mix, num_image: int, joined: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Original positions and sizes of the leaving image tokens.

    Args:
        positions: ``(B, M)`` original image-token index of each entering token; ``None``: ``0..M-1``.
        sizes: ``(B, M)`` patches each entering token stands for; ``None``: one each.
        mix: the reorganization.
        num_image: ``M``.
        joined: :func:`slots` of ``mix``, if the caller has it.

    Returns:
        ``(positions, sizes)``: a leaving token keeps its leader's position and adds up its members'
        sizes; the rest token has position ``-1`` (tables read it as their neutral last row) and the
        size of everything it absorbed. Sizes stay whole numbers: they are sums of whole numbers.
    """
    kept = mix.kept
    count = kept.shape[1]
    new_positions = kept if positions is None else positions.gather(1, kept)
    if mix.moved is not None:
        joined = slots(mix, num_image) if joined is None else joined
        sizes = torch.ones(joined.shape, device=kept.device) if sizes is None else sizes
        new_sizes = sizes.new_zeros(kept.shape[0], count + 1).scatter_add(1, joined, sizes)[:, :count]
    else:
        new_sizes = torch.ones(kept.shape, device=kept.device) if sizes is None else sizes.gather(1, kept)
    if mix.rest is not None:
        total = num_image if sizes is None else sizes.sum(dim=1, keepdim=True)
        new_positions = torch.cat([new_positions, torch.full_like(new_positions[:, :1], -1)], dim=1)
        new_sizes = torch.cat([new_sizes, total - new_sizes.sum(dim=1, keepdim=True)], dim=1)
    return new_positions, new_sizes


def destination(mix: Mix, num_image: int, joined: Tensor | None = None) -> Tensor:
    """``(B, M)``: the leaving token (``0..num_out-1``) each entering image token went into: the one
    it leads or joins, the rest token (index ``k``) if it was fused, ``-1`` if it was dropped."""
    joined = slots(mix, num_image) if joined is None else joined
    if mix.rest is not None:
        return joined
    return joined.masked_fill(joined == mix.kept.shape[1], -1)


def follow_owner(owner: Tensor | None, mix: Mix, num_image: int, joined: Tensor | None = None) -> Tensor:
    """``(B, G)``: the leaving token that carries each original patch, from ``owner``, the entering
    token that did (``None``: patch ``g`` is entering token ``g``); ``-1`` stays ``-1`` (dropped)."""
    dest = destination(mix, num_image, joined)
    if owner is None:
        return dest
    return torch.where(owner < 0, owner, dest.gather(1, owner.clamp(min=0)))


def mixing(mix: Mix, num_image: int) -> tuple[Tensor, Tensor]:
    """The reorganization as matrices, for tracking and tests (not the forward pass).

    Returns ``(weights, members)``, ``(B, T', M)`` float64 and bool: leaving token ``t`` is
    ``sum_j weights[t, j] * x_j`` over the entering image tokens ``x_j``, and ``members[t, j]``
    says token ``j`` went into it.
    """
    kept = mix.kept
    batch, count = kept.shape
    member = torch.zeros(batch, count, num_image, dtype=torch.float64, device=kept.device)
    member.scatter_(2, kept.unsqueeze(-1), 1.0)
    if mix.moved is not None:
        sample = torch.arange(batch, device=kept.device)[:, None].expand_as(mix.moved)
        member[sample, mix.into, mix.moved] = 1.0
    weight = member if mix.weight is None else member * mix.weight.to(torch.float64).unsqueeze(1)
    if mix.rest is not None:
        rest_member = 1.0 - member.sum(1, keepdim=True)
        member = torch.cat([member, rest_member], 1)
        weight = torch.cat([weight, (mix.rest.to(torch.float64) * rest_member[:, 0]).unsqueeze(1)], 1)
    if mix.mean:
        weight = weight / weight.sum(-1, keepdim=True)
    return weight, member > 0


class Reduction(abc.ABC):
    """A token reduction method: which image tokens lead, which join them, which are fused or dropped.

    A method is one subclass, registered with :func:`register_reduction`; it implements
    :meth:`select` and declares what it needs. Instances are configured per patched model
    (:meth:`from_plan`) and held by each reorganizing block; they carry no state between calls.
    """

    name: ClassVar[str]
    """The ``method=`` value that selects it."""
    accepts: ClassVar[frozenset[str]] = frozenset()
    """Plan options besides ``keep`` it honours (``"fuse"``); another value of one it does not
    honour is refused, not silently ignored."""
    needs_keys: ClassVar[bool] = False
    """:meth:`select` compares the block's attention keys (averaged over heads)."""
    weighs_sizes: ClassVar[bool] = False
    """:meth:`select` weighs tokens by the patches they stand for: the model tracks sizes."""
    proportional: ClassVar[bool] = False
    """Later attention adds ``log(size)`` by default (``proportional=None``)."""
    searches_schedule: ClassVar[bool] = False
    """Under a budget, the planner searches where reduction starts and how fast it ramps in (on
    synthetic or the user's images, :mod:`evit_patch.planning.schedule`) and a class-token head runs
    the last block's MLP on the class token alone; otherwise one keep rate at the default layers."""

    @classmethod
    def from_plan(cls, options: PlanOptions, pool: Pool) -> Reduction:
        """The instance for a model patched with ``options`` whose head pools as ``pool``."""
        return cls()

    @property
    def extra_tokens(self) -> int:
        """Leaving tokens without a position it adds when it drops anything (EViT's fused token)."""
        return 0

    def drops(self, num_image: int, keep: float) -> bool:
        """Whether the block runs :meth:`select` at all; otherwise it is an exact no-op."""
        return drops(num_image, keep)

    def tokens_after(self, num_image: int, keep: float | None) -> int:
        """Image tokens leaving a block reorganizing at ``keep`` (``None``: it does not): ``M`` when
        nothing is dropped, else ``ceil(keep * M)`` plus :attr:`extra_tokens`."""
        if keep is None or not self.drops(num_image, keep):
            return num_image
        return min(num_kept(num_image, keep), num_image) + self.extra_tokens

    @classmethod
    def default_layers(cls, num_blocks: int, budget: bool) -> tuple[int, ...]:
        """Reorganizing blocks when none are given: EViT's placement scaled to depth, blocks 3, 6, 9
        of 12 (D/4, D/2, 3D/4); ``budget``: a FLOP budget is being planned."""
        return tuple(sorted({max(1, round(num_blocks * f)) for f in (0.25, 0.5, 0.75)}))

    def macs(self, num_image: int, kept: int, *, channels: int, key_dim: int) -> int:
        """MACs per sample the method adds to a block that keeps ``kept`` of ``num_image`` tokens,
        counted as ``torch.utils.flop_counter`` counts them (matmuls; sorting and indexing are free)."""
        return 0

    @abc.abstractmethod
    def select(
        self, x: Tensor, scores: Tensor, *, keys: Tensor | None, sizes: Tensor | None, num_prefix: int, num_keep: int
    ) -> Mix:
        """Decide the reorganization.

        Args:
            x: ``(B, N, C)`` tokens after the attention residual add.
            scores: ``(B, M)`` importance of each image token (e.g. head-averaged [CLS] attention).
            keys: ``(B, N, D)`` the block's keys averaged over heads, if :attr:`needs_keys`.
            sizes: ``(B, M)`` patches each image token stands for; ``None``: one each.
            num_prefix: ``P``.
            num_keep: ``k``, ``1 <= k < M``: the leading tokens (:attr:`extra_tokens` come on top).
        """

    def __call__(
        self, x: Tensor, scores: Tensor, *, keys: Tensor | None, sizes: Tensor | None, num_prefix: int, num_keep: int
    ) -> tuple[Tensor, Mix]:
        """``(tokens, mix)``: the reorganized ``(B, P + T', C)`` tokens and the decision they were made by."""
        mix = self.select(x, scores, keys=keys, sizes=sizes, num_prefix=num_prefix, num_keep=num_keep)
        return mix_tokens(x, mix, num_prefix), mix

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Permutation(Reduction):
    """Keeps every token, re-ordered by score: the full cost of ranking and gathering with nothing
    dropped. Not registered: ``evit-patch benchmark --overhead`` and the position-following tests
    set it on a model patched at keep 1.0."""

    name = "permutation"

    def drops(self, num_image: int, keep: float) -> bool:
        return True

    def tokens_after(self, num_image: int, keep: float | None) -> int:
        return num_image

    def select(self, x, scores, *, keys, sizes, num_prefix, num_keep) -> Mix:
        return Mix(scores.topk(scores.shape[1], dim=1, sorted=True).indices)
