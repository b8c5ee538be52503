"""The plan: :class:`PlanOptions` (method, fusion, score, proportional attention), validated once
and carried from ``apply``, ``plan``, ``calibrate`` and the CLI to the rewrite, and
:class:`EViTConfig` (which blocks reorganize, at which keep rate, with those options), what a
patched model and a saved one record."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

from .checks import check_flag, check_layers, check_rates
from .errors import InvalidPlanError
from .options import Method, Pool, Score, parse_option
from .reductions import Reduction, list_reductions, reduction_class


def parse_method(value: object, where: str) -> Method | str:
    """A built-in method as its :class:`Method` member, any other registered method by its name."""
    if isinstance(value, Method):
        return value
    if isinstance(value, str) and value in list_reductions():
        return next((m for m in Method if m.value == value), value)
    raise InvalidPlanError(
        f"{where}: method must be one of {', '.join(repr(n) for n in list_reductions())}, got {value!r}"
    )


@dataclass(frozen=True)
class PlanOptions:
    """Everything a plan says besides its layers and keep rates, validated once."""

    method: Method | str = Method.EVIT
    """The reduction method (a registered name)."""
    fuse: bool = True
    """EViT: fuse the dropped tokens into one extra token."""
    score: Score | None = None
    """``None``: the family's default (the [CLS] row where there is a class token)."""
    proportional: bool | None = None
    """Proportional attention; ``None``: the method's default."""
    cls_only: bool | None = None
    """The last block runs its MLP on the prefix (class) tokens only: exact, up to float rounding, for
    a head that reads only them. ``None``: on for budgets planned by a method that searches its
    schedule (``"dam"``) on such heads, off otherwise."""
    dense: bool | None = None
    """Carry, for every original patch, which token stands for it, so that block outputs can be
    restored to the full patch grid (:func:`~evit_patch.restore`, timm's ``forward_intermediates``,
    transformers' backbones and hidden states). ``None``: on for models whose output is a feature
    map (backbones), off otherwise."""

    @classmethod
    def build(
        cls,
        *,
        method: object = Method.EVIT,
        fuse: object = True,
        score: object = None,
        proportional: object = None,
        cls_only: object = None,
        dense: object = None,
        where: str = "evit_patch",
    ) -> PlanOptions:
        """Validate user input; refuse an option the method does not honour (it would be ignored)."""
        options = cls(
            parse_method(method, where),
            check_flag(fuse, "fuse", where),
            parse_option(Score, score, where, optional=True),
            None if proportional is None else check_flag(proportional, "proportional", where),
            None if cls_only is None else check_flag(cls_only, "cls_only", where),
            None if dense is None else check_flag(dense, "dense", where),
        )
        if not options.fuse and "fuse" not in options.reduction_class.accepts:
            raise InvalidPlanError(
                f"{where}: fuse=False applies to method='evit' only; method={options.method_name!r} "
                "keeps no fused token to leave out"
            )
        if options.dense and not options.fuse:
            raise InvalidPlanError(
                f"{where}: dense=True gives every patch the feature of the token that stands for it, but with "
                "fuse=False the dropped patches have none; use fuse=True (or another method)"
            )
        if options.dense and options.cls_only:
            raise InvalidPlanError(
                f"{where}: dense=True restores every patch from the last block's image tokens, which cls_only=True "
                "leaves out; leave cls_only unset"
            )
        return options

    def resolve_dense(self, feature_maps: bool, where: str) -> PlanOptions:
        """``dense`` decided for a model whose output is (``feature_maps``) or is not a patch grid:
        ``None`` follows it, ``False`` is refused for feature maps, and ``cls_only`` stays off when dense."""
        if feature_maps and self.dense is False:
            raise InvalidPlanError(
                f"{where} returns feature maps with a feature for every patch, which a reduced model serves only "
                "with dense=True; leave dense unset"
            )
        dense = feature_maps if self.dense is None else self.dense
        cls_only = False if dense and self.cls_only is None else self.cls_only
        resolved = dataclasses.replace(self, dense=dense, cls_only=cls_only)
        return PlanOptions.build(**{f.name: getattr(resolved, f.name) for f in dataclasses.fields(self)}, where=where)

    @property
    def method_name(self) -> str:
        return self.method.value if isinstance(self.method, Method) else str(self.method)

    @property
    def reduction_class(self) -> type[Reduction]:
        return reduction_class(self.method_name)

    @property
    def proportional_attention(self) -> bool:
        """Whether later blocks add ``log(size)`` to their attention logits (``proportional`` resolved)."""
        return self.reduction_class.proportional if self.proportional is None else self.proportional

    def reduction(self, pool: Pool) -> Reduction:
        """The configured method for a model whose head pools as ``pool``."""
        return self.reduction_class.from_plan(self, pool)

    def as_kwargs(self) -> dict:
        """As keyword arguments of :func:`~evit_patch.apply`."""
        kwargs = {"fuse": self.fuse, "score": self.score, "method": self.method, "proportional": self.proportional}
        kwargs |= {} if self.cls_only is None else {"cls_only": self.cls_only}
        return kwargs | ({} if self.dense is None else {"dense": self.dense})

    def to_dict(self) -> dict:
        return {
            "fuse": self.fuse,
            "score": None if self.score is None else self.score.value,
            "method": self.method_name,
            "proportional": self.proportional,
            "cls_only": bool(self.cls_only),
            "dense": bool(self.dense),
        }


def _check_keep(keep: object, what: str) -> float:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not math.isfinite(keep) or not 0.0 < keep <= 1.0:
        raise InvalidPlanError(f"{what}: keep must be a number in (0, 1], got {keep!r}")
    return float(keep)


@dataclass(frozen=True)
class EViTConfig:
    """Where EViT reorganizes tokens: ``layers`` (0-indexed blocks, ascending), one keep rate each,
    and the :class:`~evit_patch.options.PlanOptions` fields."""

    layers: tuple[int, ...]
    keep: tuple[float, ...]
    fuse: bool = True
    score: Score | None = None
    """``Score.CLS`` (EViT), ``Score.RECEIVED`` (attention received), or ``None``: the family's default."""
    method: Method | str = Method.EVIT
    """What becomes of the tokens not kept: EViT's fused token (the default), merging, or any
    registered reduction (by name)."""
    proportional: bool | None = None
    """Proportional attention (``log(size)`` added to later attention logits); ``None``: the
    method's default (on for merging, off for EViT, the paper's form)."""
    cls_only: bool = False
    """The last block runs its MLP on the prefix (class) tokens only (see :class:`PlanOptions`)."""
    dense: bool = False
    """Block outputs can be restored to the full patch grid (see :class:`PlanOptions`)."""

    @property
    def plan_options(self) -> PlanOptions:
        """The plan's options as one object."""
        return PlanOptions(self.method, self.fuse, self.score, self.proportional, self.cls_only, self.dense)

    @property
    def proportional_attention(self) -> bool:
        """Whether later blocks add ``log(size)`` to their attention logits (``proportional`` resolved)."""
        return self.plan_options.proportional_attention

    @classmethod
    def build(
        cls,
        layers: int | Iterable[int],
        keep: float | Iterable[float],
        options: PlanOptions | None = None,
        *,
        num_blocks: int,
        where: str = "model",
    ) -> EViTConfig:
        """Validate user input against a model with ``num_blocks`` blocks.

        ``keep`` is one rate for every layer or one per layer, in the order ``layers`` was given;
        ``options`` (default: EViT's) come validated from :meth:`PlanOptions.build`.
        """
        check_layers(layers, where)
        check_rates(keep, "keep", where)
        options = options or PlanOptions()
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
        return cls(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)).with_options(options)

    def with_options(self, options: PlanOptions) -> EViTConfig:
        """A copy with every option taken from ``options``."""
        return dataclasses.replace(
            self,
            fuse=options.fuse,
            score=options.score,
            method=options.method,
            proportional=options.proportional,
            cls_only=bool(options.cls_only),
            dense=bool(options.dense),
        )

    def options(self) -> dict:
        """Everything but ``layers`` and ``keep``, as keyword arguments of :func:`~evit_patch.apply`."""
        return self.plan_options.as_kwargs()

    def replace(self, **changes) -> EViTConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def keep_at(self, layer: int) -> float | None:
        """The keep rate at ``layer``, ``None`` where the block does not reorganize."""
        return dict(zip(self.layers, self.keep)).get(layer)

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "keep": list(self.keep), **self.plan_options.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> EViTConfig:
        layers, keep = tuple(data["layers"]), tuple(float(k) for k in data["keep"])
        options = PlanOptions.build(
            method=data.get("method", Method.EVIT.value),
            fuse=data.get("fuse", True),
            score=data.get("score"),
            proportional=data.get("proportional"),
            cls_only=data.get("cls_only", False),
            dense=data.get("dense", False),
            where="EViTConfig",
        )
        return cls(layers, keep).with_options(options)
