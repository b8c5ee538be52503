"""``explain``: per block tokens in/out and analytic GMACs before/after, as a readable table."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import EViTConfig
from ..families import find_family
from ..graph.profile import ModelProfile, profile_model
from ..graph.state import get_config
from ..options import Method, Score


@dataclass(frozen=True)
class BlockRow:
    index: int
    name: str
    keep: float | None
    tokens_in: int
    tokens_out: int
    macs_original: int
    macs_patched: int


@dataclass(frozen=True)
class Explanation:
    """What a patched model computes, per block; ``str()`` gives the table."""

    model: str
    img_size: tuple[int, int] | None
    fuse: bool
    rows: tuple[BlockRow, ...]
    outside_macs: int
    score: Score = Score.CLS
    """What ranks the tokens."""
    method: Method | str = Method.EVIT
    """What becomes of the tokens not kept (the reduction method)."""
    proportional: bool = False
    pool_macs_original: int = 0
    """An attention-pool head's token-dependent MACs (keys and values of every token it reads)."""
    pool_macs_patched: int = 0
    """The same for the tokens leaving the patched model's last block."""
    family: str = ""
    """The family that described the model (``"discovered"``: structural discovery, see :attr:`discovered`)."""
    discovered: str = ""
    """What structural discovery found (empty for a registered family)."""
    cls_only: bool = False
    """The last block runs its MLP on the prefix (class) tokens only."""
    dense: bool = False
    """Block outputs restore to the full patch grid (``dense=True``)."""

    @property
    def macs_original(self) -> int:
        return self.outside_macs + self.pool_macs_original + sum(r.macs_original for r in self.rows)

    @property
    def macs_patched(self) -> int:
        return self.outside_macs + self.pool_macs_patched + sum(r.macs_patched for r in self.rows)

    @property
    def ideal_speedup(self) -> float:
        """FLOP ratio original / patched: the speedup a compute-bound device could reach."""
        return self.macs_original / self.macs_patched

    def __str__(self) -> str:
        size = f" at {self.img_size[0]}x{self.img_size[1]}" if self.img_size else ""
        family = f"family={self.family}, " if self.family else ""
        proportional = "on" if self.proportional else "off"
        lines = [
            f"EViT plan for {self.model}{size} ({family}method={getattr(self.method, 'value', self.method)}, "
            f"fuse={self.fuse}, score={self.score.value}, proportional attention={proportional})",
            *([f"found by structural discovery: {self.discovered}"] if self.discovered else []),
            *(["last block: its MLP runs on the class token(s) only (cls_only)"] if self.cls_only else []),
            *(["dense: every block's output restores to the full patch grid"] if self.dense else []),
            f"{'block':>5} {'keep':>5} {'tokens in':>9} {'MLP tokens':>10} {'GMACs orig':>10} {'GMACs EViT':>10}",
        ]
        for r in self.rows:
            keep = f"{r.keep:.2f}" if r.keep is not None else "-"
            lines.append(
                f"{r.index:>5} {keep:>5} {r.tokens_in:>9} {r.tokens_out:>10} "
                f"{r.macs_original / 1e9:>10.3f} {r.macs_patched / 1e9:>10.3f}"
            )
        head_original = (self.outside_macs + self.pool_macs_original) / 1e9
        head_patched = (self.outside_macs + self.pool_macs_patched) / 1e9
        lines.append(f"{'embed+head':>27} {'':>10} {head_original:>10.3f} {head_patched:>10.3f}")
        lines.append(
            f"{'total':>27} {'':>10} {self.macs_original / 1e9:>10.3f} {self.macs_patched / 1e9:>10.3f}"
            f"   ({self.macs_patched / self.macs_original:.3f}x MACs, ideal speedup {self.ideal_speedup:.2f}x)"
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class CostModel:
    """A model's analytic cost at one input size, for any EViT configuration, without running it."""

    profile: ModelProfile
    tokens: int
    """Tokens entering the first block."""
    outside_macs: int
    img_size: tuple[int, int] | None = None

    @classmethod
    def of(cls, model: nn.Module, img_size: int | tuple[int, int] | None = None) -> CostModel:
        family = find_family(model)
        size = None if img_size is None else ((img_size, img_size) if isinstance(img_size, int) else tuple(img_size))
        return cls(profile_model(model), family.num_tokens(model, size), family.outside_macs(model, size), size)

    @property
    def num_blocks(self) -> int:
        return len(self.profile.costs)

    @property
    def macs_original(self) -> int:
        """MACs per sample of the unpatched model at this input size."""
        blocks = sum(cost.macs(self.tokens) for cost in self.profile.costs)
        return self.outside_macs + self.profile.pool_macs(self.tokens) + blocks

    def explain(self, config: EViTConfig) -> Explanation:
        tokens, rows = self.tokens, []
        score = config.score or self.profile.score
        received = score is Score.RECEIVED
        reduction = config.plan_options.reduction(self.profile.pool)
        last = len(self.profile.costs) - 1
        for index, (name, cost) in enumerate(zip(self.profile.block_names, self.profile.costs)):
            keep = config.keep_at(index)
            prefix_only = config.cls_only and index == last
            out = cost.tokens_out(tokens, keep, reduction, prefix_only)
            rows.append(
                BlockRow(
                    index,
                    name,
                    keep,
                    tokens,
                    out,
                    macs_original=cost.macs(self.tokens),
                    macs_patched=cost.macs(tokens, keep, reduction, received, prefix_only),
                )
            )
            tokens = out
        return Explanation(
            self.profile.model,
            self.img_size,
            config.fuse,
            tuple(rows),
            self.outside_macs,
            score,
            config.method,
            config.proportional_attention,
            self.profile.pool_macs(self.tokens),
            self.profile.pool_macs(tokens),
            self.profile.family,
            self.profile.discovered,
            config.cls_only,
            config.dense,
        )

    def macs(self, config: EViTConfig) -> int:
        return self.explain(config).macs_patched


def explain(
    model: nn.Module, img_size: int | tuple[int, int] | None = None, *, config: EViTConfig | None = None
) -> Explanation:
    """Explain a patched model (or an original one under a hypothetical ``config``) at ``img_size``."""
    if config is None:  # before tracing: an unpatched model without a config is the caller's mistake
        config = get_config(model, what="explain", hint=", or pass config=EViTConfig(...) to explain a plan")
    return CostModel.of(model, img_size).explain(config)
