"""Exceptions raised by evit_patch.

Every refusal names the model class, the block and what was expected versus found, so a user
can tell at once whether the model is out of scope or the call was wrong.
"""

from __future__ import annotations


class EViTError(Exception):
    """Base class of every error evit_patch raises on purpose."""


class InvalidPlanError(EViTError, ValueError):
    """The requested layers or keep rates are malformed for this model."""


class UnsupportedModelError(EViTError, TypeError):
    """The model (or one of its blocks) has a structure EViT cannot be applied to soundly."""


class UnsupportedInputError(EViTError, ValueError):
    """A patched model was called with an input its traced blocks were specialised against."""


class CheckpointError(EViTError, ValueError):
    """A saved evit_patch model is missing, malformed, or does not match what is loaded into."""


class UsageError(EViTError, ValueError):
    """A command-line flag or an input file (images, folders) is not what the command needs."""


class VerificationError(EViTError, RuntimeError):
    """A patched model's traced token counts differ from its analytic plan: a bug in evit_patch, reported
    at patch time rather than as wrong MACs or a failure at serving time."""
