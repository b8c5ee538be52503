"""The output check: a patched model must still mean what the original meant, or it is refused.

Token counts (``verify.py``) say the rewrite did what the plan said; they cannot say that the
family (or discovery) described the model's code faithfully. Two checks can, at patch time:

- with every keep rate at 1.0 (no token moves), the patched model's outputs equal the original's
  on one small real image: every output, shapes and values, bitwise where no block was
  re-expressed (on the CPU), else up to rounding;
- at the requested keep rates, every output has the original's shape (from the fake forward
  ``verify`` already ran): an output that reads every token (hidden states, per-token features),
  or that carries the token state's extra channels, changes shape and is refused. Outputs a family
  declares per-token by design (:meth:`Family.token_outputs`, transformers' ``last_hidden_state``)
  may change their token count only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten_with_path

from ..errors import UnsupportedModelError
from ..families import Family, describe
from .state import reorganizers


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (every submodule) and no autograd; each submodule's mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.train(mode)


@contextmanager
def _keeping_every_token(model: nn.Module) -> Iterator[None]:
    found = reorganizers(model)
    rates = [m.keep for m in found]
    for module in found:
        module.keep = 1.0
    try:
        yield
    finally:
        for module, rate in zip(found, rates):
            module.keep = rate


def _leaves(output: Any) -> list[tuple[str, Any]]:
    leaves, _ = tree_flatten_with_path(output)
    return [(keystr(path) or "", value) for path, value in leaves]


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def _same_but_tokens(a: Any, b: Any) -> bool:
    """``(B, N, C)`` outputs that differ in the token count ``N`` only (a family's token outputs)."""
    return isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() == b.dim() == 3 and a.shape[::2] == b.shape[::2]


def _difference(original: Any, patched: Any, exact: bool) -> str | None:
    """What differs between two outputs, or ``None``."""
    left, right = _leaves(original), _leaves(patched)
    if [p for p, _ in left] != [p for p, _ in right]:
        return f"its outputs are {[p for p, _ in right]}, the original's {[p for p, _ in left]}"
    for (path, a), (_, b) in zip(left, right):
        if isinstance(a, Tensor) != isinstance(b, Tensor) or (isinstance(a, Tensor) and a.shape != b.shape):
            return f"output{path} has shape {_shape(b)}, the original's {_shape(a)}"
        if not isinstance(a, Tensor):
            if a != b:
                return f"output{path} is {b!r}, the original's {a!r}"
            continue
        if exact and torch.equal(a, b):
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        gap = float((a64 - b64).abs().amax()) if a.numel() else 0.0
        scale = max(float(a64.abs().amax()) if a.numel() else 0.0, 1.0)
        tolerance = 0.0 if exact else (1e-3 if a.dtype in (torch.float32, torch.float64) else 5e-2) * scale
        if not gap <= tolerance:  # also catches NaN
            return f"output{path} differs by up to {gap:.3g}" + (" (expected bitwise equality)" if exact else "")
    return None


def verify_outputs(
    original: nn.Module,
    patched: nn.Module,
    family: Family,
    reduced_output: Any,
    *,
    exact: bool,
) -> None:
    """Refuse ``patched`` unless it computes the original's outputs at keep 1.0 and keeps their shapes.

    Args:
        original: the unpatched model at the patched copy's input size (it is run, not changed).
        reduced_output: the patched model's output on one image (fake, or real and random) at the requested keep rates.
        exact: no block was re-expressed: at keep 1.0 the outputs must be bitwise equal (on the CPU).

    Raises:
        UnsupportedModelError: an output differs; nothing is returned to the user.
    """
    who = f"{describe(original)} ({family.name})"
    param = next(patched.parameters(), None)
    if param is None or param.is_meta:
        return
    size = family.input_size(patched)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, family.in_chans(patched), *size, generator=generator).to(param.device, param.dtype)
    with evaluating(original):
        expected = original(image)
    with evaluating(patched), _keeping_every_token(patched):
        same = patched(image)
    found = _difference(expected, same, exact and param.device.type == "cpu")
    if found is not None:
        raise UnsupportedModelError(
            f"{who}: with every token kept (keep=1.0) the patched model must compute the original's outputs, but "
            f"its {found}: the structure evit_patch read does not match the model's code, so it is not patched"
        )
    tokens = set(family.token_outputs(patched))
    for (path, want), (_, got) in zip(_leaves(expected), _leaves(reduced_output)):
        if path in tokens and _same_but_tokens(want, got):
            continue
        want, got = _shape(want), _shape(got)
        if want != got:
            raise UnsupportedModelError(
                f"{who}: with tokens reorganized the patched model's output{path} has shape {got}, the original's "
                f"{want}: that output reads the tokens EViT drops and fuses (a per-token output or hidden state); "
                "expected every output to keep its shape"
            )
