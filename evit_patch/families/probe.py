"""One real forward of a model no family claims, with every module hooked: what discovery reads.

Two random images run through the model in eval mode, with autograd on (the readout is found by
differentiating the output, see ``readout.py``). Each module call is recorded with its first
tensor input and its tensor output, whether an attention op ran inside it (a softmax, SDPA, an
``nn.MultiheadAttention``) and the FLOPs counted while it ran. The image size is found by trying
the sizes the model's own tensors suggest (a position table of ``T`` rows and a patch of ``p``
pixels: ``sqrt(T - k) * p``), then common sizes; nothing is read by attribute name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

_ATTENTION_FUNCTIONS = {"softmax", "scaled_dot_product_attention", "multi_head_attention_forward"}
_COMMON_SIZES = (224, 256, 384, 32, 64, 96, 128, 160, 192, 288, 448, 512, 518)
_MAX_TRIES = 12


@dataclass(eq=False)
class Call:
    """One module call: its name, first tensor argument and tensor output (batch of two images)."""

    name: str
    module: nn.Module
    start: int
    end: int = -1
    input: Tensor | None = None
    output: Tensor | None = None
    attention: int = 0
    """Attention ops that ran inside this call (nested calls included)."""
    flops: int = 0
    """FLOPs counted while it ran (two images)."""


@dataclass
class Probe:
    """What one hooked forward recorded."""

    image: Tensor
    """``(2, C, H, W)``: two random images, requiring grad."""
    calls: list[Call]
    output: Any
    total_flops: int

    @property
    def size(self) -> tuple[int, int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2]), int(self.image.shape[3])

    def named(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]

    def within(self, name: str) -> list[Call]:
        """Calls of ``name`` and of the modules inside it."""
        return [c for c in self.calls if c.name == name or c.name.startswith(name + ".")]


class _AttentionEvents(TorchFunctionMode):
    """Counts attention functions against every module call running at the time."""

    def __init__(self, stack: list[Call]) -> None:
        super().__init__()
        self.stack = stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _ATTENTION_FUNCTIONS:
            for call in self.stack:
                call.attention += 1
        return func(*args, **(kwargs or {}))


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.train(mode)


def run(model: nn.Module, size: tuple[int, int, int], replace: dict[str, Any] | None = None) -> Probe:
    """Run ``model`` once on two random ``size`` images with every module hooked.

    ``replace``: module name -> ``fn(output) -> output`` applied by a forward hook (the readout's
    what-if runs). Raises whatever the model raises for an input it does not take.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, *size, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
    calls: list[Call] = []
    stack: list[Call] = []
    counter = FlopCounterMode(display=False)
    replace = replace or {}

    def before(name: str):
        def hook(module, args, kwargs):
            call = Call(name, module, len(calls), input=_first_tensor(args, kwargs), flops=counter.get_total_flops())
            if isinstance(module, nn.MultiheadAttention):
                for outer in (*stack, call):
                    outer.attention += 1
            calls.append(call)
            stack.append(call)

        return hook

    def after(name: str):
        def hook(module, args, kwargs, output):
            call = stack.pop()
            call.end, call.flops = len(calls), counter.get_total_flops() - call.flops
            if name in replace:
                output = replace[name](output)
            call.output = output if isinstance(output, Tensor) else None
            return output

        return hook

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
        handles.append(module.register_forward_hook(after(name), with_kwargs=True, always_call=True))
    try:
        with _eval(model), torch.enable_grad(), counter, _AttentionEvents(stack):
            output = model(image)
    finally:
        for handle in handles:
            handle.remove()
    return Probe(image, calls, output, counter.get_total_flops())


@dataclass
class Sizes:
    """The input sizes to try, most likely first, and what each try raised."""

    candidates: list[tuple[int, int, int]]
    failures: list[str] = field(default_factory=list)


def candidate_sizes(model: nn.Module) -> list[tuple[int, int, int]]:
    """``(channels, height, width)`` to try: from the model's position-like tables and patch sizes
    (a ``T``-row table with ``k`` extra tokens on a grid of ``p``-pixel patches), then common sizes."""
    channels, patches = _channels_and_patches(model)
    rows = _table_rows(model)
    found: list[tuple[int, int, int]] = []
    for extra in range(0, 9):
        for count in rows:
            side = math.isqrt(max(count - extra, 0))
            if side > 0 and side * side == count - extra:
                found += [(channels, side * p, side * p) for p in patches]
    found += [(channels, s, s) for s in _COMMON_SIZES]
    unique = list(dict.fromkeys(found))
    return unique[:_MAX_TRIES]


def _channels_and_patches(model: nn.Module) -> tuple[int, list[int]]:
    """Image channels (the first convolution's input, else 3) and patch-size candidates: convolutions
    whose stride is their kernel, and the lengths an einops patch rearrangement names."""
    channels, patches = None, []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            channels = channels or module.in_channels
            if module.kernel_size == module.stride and module.kernel_size[0] > 1:
                patches.append(int(module.kernel_size[0]))
        lengths = getattr(module, "axes_lengths", None) if type(module).__module__.startswith("einops") else None
        if isinstance(lengths, dict):
            patches += [int(v) for v in lengths.values() if isinstance(v, int) and v > 1]
    return channels or 3, list(dict.fromkeys(patches)) or [16, 14, 8]


def _table_rows(model: nn.Module) -> list[int]:
    """Row counts of 2-D/3-D float tables that are not a standard layer's weights (position
    embeddings as parameters, buffers, plain tensor attributes, or ``nn.Embedding`` weights)."""
    rows = []
    for module in model.modules():
        standard = type(module).__module__.startswith("torch.nn") and not isinstance(module, nn.Embedding)
        if standard:
            continue
        tensors = [*module._parameters.values(), *module._buffers.values()]
        tensors += [v for v in vars(module).values() if isinstance(v, Tensor)]
        for tensor in tensors:
            if tensor is not None and tensor.is_floating_point() and tensor.dim() in (2, 3) and tensor.shape[-2] > 1:
                rows.append(int(tensor.shape[-2]))
    return list(dict.fromkeys(rows))


def first_run(model: nn.Module) -> tuple[Probe | None, list[str]]:
    """The probe at the first candidate size the model takes, and what the other tries raised."""
    failures = []
    for size in candidate_sizes(model):
        try:
            return run(model, size), failures
        except Exception as exc:  # any model error: this is not the size it takes
            failures.append(f"{size[0]}x{size[1]}x{size[2]}: {type(exc).__name__}")
    return None, failures
