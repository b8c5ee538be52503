"""The EViT configuration: which blocks reorganize, at which keep rate, with or without fusion."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

from .checks import check_flag, check_layers, check_rates
from .errors import InvalidPlanError


def _check_keep(keep: object, what: str) -> float:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not math.isfinite(keep) or not 0.0 < keep <= 1.0:
        raise InvalidPlanError(f"{what}: keep must be a number in (0, 1], got {keep!r}")
    return float(keep)


SCORES = ("cls", "received")


def check_score(score: object, where: str) -> str | None:
    if score is not None and score not in SCORES:
        raise InvalidPlanError(f"{where}: score must be one of {SCORES} or None (the family's default), got {score!r}")
    return score


@dataclass(frozen=True)
class EViTConfig:
    """Where EViT reorganizes tokens: ``layers`` (0-indexed blocks, ascending), one keep rate each."""

    layers: tuple[int, ...]
    keep: tuple[float, ...]
    fuse: bool = True
    score: str | None = None
    """``"cls"`` (EViT), ``"received"`` (attention received), or ``None``: the family's default."""

    @classmethod
    def build(
        cls,
        layers: int | Iterable[int],
        keep: float | Iterable[float],
        fuse: bool = True,
        *,
        num_blocks: int,
        where: str = "model",
        score: str | None = None,
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
        return cls(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), fuse, check_score(score, where))

    def keep_at(self, layer: int) -> float | None:
        """The keep rate at ``layer``, ``None`` where the block does not reorganize."""
        return dict(zip(self.layers, self.keep)).get(layer)

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "keep": list(self.keep), "fuse": self.fuse, "score": self.score}

    @classmethod
    def from_dict(cls, data: dict) -> EViTConfig:
        layers, keep = tuple(data["layers"]), tuple(float(k) for k in data["keep"])
        fuse = check_flag(data.get("fuse", True), "fuse", "EViTConfig")
        return cls(layers, keep, fuse, check_score(data.get("score"), "EViTConfig"))
