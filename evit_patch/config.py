"""The EViT configuration: which blocks reorganize, at which keep rate, with or without fusion."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

from .checks import check_flag, check_layers, check_rates
from .errors import InvalidPlanError
from .options import Method, Score, parse_option


def _check_keep(keep: object, what: str) -> float:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not math.isfinite(keep) or not 0.0 < keep <= 1.0:
        raise InvalidPlanError(f"{what}: keep must be a number in (0, 1], got {keep!r}")
    return float(keep)


@dataclass(frozen=True)
class EViTConfig:
    """Where EViT reorganizes tokens: ``layers`` (0-indexed blocks, ascending), one keep rate each."""

    layers: tuple[int, ...]
    keep: tuple[float, ...]
    fuse: bool = True
    score: Score | None = None
    """``Score.CLS`` (EViT), ``Score.RECEIVED`` (attention received), or ``None``: the family's default."""
    method: Method = Method.EVIT
    """What becomes of the tokens not kept: EViT's fused token (the default), or merging."""
    proportional: bool | None = None
    """Proportional attention (``log(size)`` added to later attention logits); ``None``: on for
    merging, off for EViT (the paper's form)."""

    @property
    def proportional_attention(self) -> bool:
        """Whether later blocks add ``log(size)`` to their attention logits (``proportional`` resolved)."""
        return self.method is Method.MERGE if self.proportional is None else self.proportional

    @classmethod
    def build(
        cls,
        layers: int | Iterable[int],
        keep: float | Iterable[float],
        fuse: bool = True,
        *,
        num_blocks: int,
        where: str = "model",
        score: str | Score | None = None,
        method: str | Method = Method.EVIT,
        proportional: bool | None = None,
    ) -> EViTConfig:
        """Validate user input against a model with ``num_blocks`` blocks.

        ``keep`` is one rate for every layer or one per layer, in the order ``layers`` was given.
        """
        check_layers(layers, where)
        check_rates(keep, "keep", where)
        fuse = check_flag(fuse, "fuse", where)
        layer_list = [layers] if isinstance(layers, numbers.Integral) else list(layers)
        if not layer_list:
            raise InvalidPlanError(f"{where}: layers is empty; expected at least one block index")
        for layer in layer_list:
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                raise InvalidPlanError(f"{where}: layer indices must be integers, got {layer!r}")
            if not 0 <= layer < num_blocks:
                raise InvalidPlanError(
                    f"{where}: layer {layer} is out of range; the model has {num_blocks} blocks "
                    f"(valid indices 0..{num_blocks - 1})"
                )
        repeated = sorted({x for x in layer_list if layer_list.count(x) > 1})
        if repeated:
            raise InvalidPlanError(f"{where}: layers {repeated} are repeated; each block reorganizes once")
        if isinstance(keep, numbers.Real):
            keeps = [keep] * len(layer_list)
        else:
            keeps = list(keep)
            if len(keeps) != len(layer_list):
                raise InvalidPlanError(
                    f"{where}: got {len(keeps)} keep rates for {len(layer_list)} layers; "
                    "give one rate, or one per layer"
                )
        keeps = [_check_keep(k, f"{where}, layer {layer}") for layer, k in zip(layer_list, keeps)]
        pairs = sorted(zip((int(x) for x in layer_list), keeps))
        return cls(
            tuple(p[0] for p in pairs),
            tuple(p[1] for p in pairs),
            fuse,
            parse_option(Score, score, where, optional=True),
            parse_option(Method, method, where),
            None if proportional is None else check_flag(proportional, "proportional", where),
        )

    def options(self) -> dict:
        """Everything but ``layers`` and ``keep``, as keyword arguments of :func:`~evit_patch.apply`."""
        return {"fuse": self.fuse, "score": self.score, "method": self.method, "proportional": self.proportional}

    def replace(self, **changes) -> EViTConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def keep_at(self, layer: int) -> float | None:
        """The keep rate at ``layer``, ``None`` where the block does not reorganize."""
        return dict(zip(self.layers, self.keep)).get(layer)

    def to_dict(self) -> dict:
        return {
            "layers": list(self.layers),
            "keep": list(self.keep),
            "fuse": self.fuse,
            "score": None if self.score is None else self.score.value,
            "method": self.method.value,
            "proportional": self.proportional,
        }

    @classmethod
    def from_dict(cls, data: dict) -> EViTConfig:
        layers, keep = tuple(data["layers"]), tuple(float(k) for k in data["keep"])
        where = "EViTConfig"
        return cls(
            layers,
            keep,
            check_flag(data.get("fuse", True), "fuse", where),
            parse_option(Score, data.get("score"), where, optional=True),
            parse_option(Method, data.get("method", Method.EVIT.value), where),
            None if data.get("proportional") is None else check_flag(data["proportional"], "proportional", where),
        )
