"""The vocabularies a plan is written in: one enum each, accepted as the enum or its string value.

The enums subclass ``str``, so ``Score.CLS == "cls"`` and a config serialises to JSON as the plain
value; everything inside the package compares enum members. :class:`~evit_patch.config.PlanOptions`
carries them through ``apply``, ``plan``, ``calibrate``, saved configs and the CLI.
"""

from __future__ import annotations

import enum

from .errors import InvalidPlanError


class Score(str, enum.Enum):
    """What ranks the image tokens."""

    CLS = "cls"
    """EViT: the class token's attention, averaged over heads."""
    RECEIVED = "received"
    """No class token: attention received from every query, averaged over heads and queries."""


class Method(str, enum.Enum):
    """The built-in reduction methods (``evit_patch.reductions``); a registered method is selected
    by its name as well."""

    EVIT = "evit"
    """EViT exactly: fused into one extra token, their sum weighted by the raw [CLS] attention
    (or dropped, with ``fuse=False``)."""
    MERGE = "merge"
    """Each is averaged into the kept token whose key it resembles most (cosine of head-averaged
    keys), weighted by how many patches each stands for; later blocks add ``log(size)`` to the
    attention logits (proportional attention)."""
    DAM = "dam"
    """Distinctive-attended merging: keep the tokens both attended and unlike any other, merge the rest
    into their most similar kept token; under a budget its schedule is searched on synthetic images.
    The best training-free choice measured here (docs/training-free.md)."""


class Pool(str, enum.Enum):
    """How a model's head reads the tokens leaving its last block."""

    TOKEN = "token"
    """It reads prefix tokens (the class token) only."""
    AVG = "avg"
    """It averages the image tokens: a fused or merged token must count as the tokens it stands for."""
    ATTENTION = "attention"
    """A probe attends over the tokens: a fused or merged token must weigh as the tokens it stands
    for in its softmax."""


def parse_option(kind: type[enum.Enum], value: object, where: str, *, optional: bool = False):
    """``value`` as a member of ``kind`` (a member, or its string value); ``None`` if ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        for member in kind:
            if member.value == value:
                return member
    choices = ", ".join(repr(m.value) for m in kind) + (" or None" if optional else "")
    name = kind.__name__.lower()
    raise InvalidPlanError(f"{where}: {name} must be one of {choices}, got {value!r}")
