"""Structural discovery: what a family would say about a model no family claims, read off its behaviour.

One hooked forward on two random images (``probe.py``) gives the input size, the block stack
(``stack.py``), the tokens entering it (rows that are the same for both images are the prefix
tokens: they do not depend on the image), the patch grid, the per-token module after the last
block, and, by autograd and one what-if run, how the output reads the final tokens
(``readout.py``). Blocks whose residual adds live in the module that runs them are restructured
on a copy first (``restructure.py``) and probed again.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..options import Pool
from .base import class_path_of
from .probe import Call, Probe, first_run, run
from .readout import classify, kept_replacement, mean_replacement, read_rows, same_output
from .restructure import restructure
from .stack import Stack, find_stack, keeps_stream

GUIDE = "docs/adding-a-family.md"


class NoStructure(Exception):
    """Discovery found no vision transformer: what it found, and what it did not."""

    def __init__(self, found: list[str], missing: str) -> None:
        super().__init__(missing)
        self.found, self.missing = found, missing


@dataclass(frozen=True)
class Structure:
    """What discovery found; every name is a qualified module name in the model."""

    model: str
    units: tuple[str, ...]
    runner: str | None
    """Set when the units' residual adds live in this module: a copy is restructured (``restructure.py``)."""
    tokens: int
    channels: int
    prefix: int
    grid: tuple[int, int] | None
    in_chans: int
    input_size: tuple[int, int]
    pool: Pool
    class_token: bool
    """There are prefix tokens: the first is taken for a class token, whose attention ranks the image
    tokens (as EViT does; a head that averages the image tokens may ignore it)."""
    final_norm: str | None
    outside_macs: int
    leaf_types: tuple[type[nn.Module], ...]

    def summary(self) -> str:
        """One line: what was found, for ``explain`` and messages."""
        blocks = f"{self.units[0]!r}..{self.units[-1]!r}" if len(self.units) > 1 else repr(self.units[0])
        runner = f", residual adds in {self.runner or 'forward'!r}" if self.runner is not None else ""
        pool = {Pool.TOKEN: "reads the class token", Pool.AVG: "averages the image tokens"}[self.pool]
        norm = f", final norm {self.final_norm!r}" if self.final_norm else ", no per-token module after the blocks"
        return (
            f"{len(self.units)} blocks {blocks}{runner}; {self.tokens} tokens x {self.channels} channels on "
            f"{self.in_chans}x{self.input_size[0]}x{self.input_size[1]} images, {self.prefix} prefix; "
            f"the output {pool}{norm}"
        )


def discover(model: nn.Module) -> Structure:
    """Discover ``model``'s structure (the model is run, never changed).

    Raises:
        NoStructure: no vision transformer was found (the caller names the supported families).
        UnsupportedModelError: a vision transformer whose output EViT cannot serve.
    """
    who = class_path_of(model)
    if any(p.is_meta for p in model.parameters()):
        raise NoStructure([], "cannot run a model on the meta device")
    probe, failures = first_run(model)
    if probe is None:
        raise NoStructure([], f"found no image input it accepts (tried {', '.join(failures)})")
    size = probe.size
    found = [f"it takes {size[0]}x{size[1]}x{size[2]} images"]
    stack = find_stack(model, probe)
    if stack is None:
        streams = sorted({type(c.module).__name__ for c in probe.calls if keeps_stream(c)})
        found.append(
            f"modules that keep a (batch, tokens, channels) shape: {', '.join(streams)}"
            if streams
            else "no module keeps a (batch, tokens, channels) shape"
        )
        missing = "found no stack of attention blocks run one after another on (batch, tokens, channels)"
        raise NoStructure(found, missing)
    probed = model
    if not stack.called:
        probed, stack, probe = _restructured(model, stack, size, who)
    return _read(model, probed, stack, probe, who)


def _restructured(model: nn.Module, stack: Stack, size, who: str) -> tuple[nn.Module, Stack, Probe]:
    if not stack.runner:
        raise UnsupportedModelError(
            f"{who}: discovered blocks {stack.units[0]!r}..{stack.units[-1]!r}, but their residual adds are in "
            f"{type(model).__name__}.forward itself; expected them inside a submodule that runs the blocks "
            f"(to support it anyway, see {GUIDE})"
        )
    probed = copy.deepcopy(model)
    restructure(probed, stack.runner, stack.units, who)
    probe = run(probed, size)
    restacked = Stack(stack.units, True, stack.runner)
    calls = [probe.named(u) for u in stack.units]
    if any(len(c) != 1 or not keeps_stream(c[0]) for c in calls):
        raise UnsupportedModelError(
            f"{who}: restructured blocks {stack.units[0]!r}..{stack.units[-1]!r} from "
            f"{stack.runner!r}, but they do not each map the tokens to the same shape"
        )
    return probed, restacked, probe


def _prefix(tokens: Tensor, who: str) -> int:
    """Rows equal for both images do not depend on the image: prefix tokens, which must come first."""
    same = [bool(torch.equal(tokens[0, j], tokens[1, j])) for j in range(tokens.shape[1])]
    prefix = same.index(False) if False in same else len(same)
    late = [j for j in range(prefix, len(same)) if same[j]]
    if late or prefix == len(same):
        raise UnsupportedModelError(
            f"{who}: the tokens entering the first block that do not depend on the image are rows "
            f"{[j for j, s in enumerate(same) if s]} of {len(same)}; expected them first (class and register "
            "tokens before the image tokens)"
        )
    return prefix


def _grid(probe: Probe, first: Call, image_tokens: int) -> tuple[int, int] | None:
    """The patch grid: the last 4-D tensor before the blocks with that many cells, else the image's aspect."""
    for call in reversed(probe.calls[: first.start]):
        out = call.output
        if out is not None and out.dim() == 4 and out.shape[-2] * out.shape[-1] == image_tokens:
            return int(out.shape[-2]), int(out.shape[-1])
    _, height, width = probe.size
    patch = math.isqrt(height * width // image_tokens) if image_tokens else 0
    if patch and height % patch == 0 and width % patch == 0 and (height // patch) * (width // patch) == image_tokens:
        return height // patch, width // patch
    return None


def _per_token(call: Call) -> bool:
    """Each output row depends on its own input row only: running on the first rows gives the first rows."""
    x = call.input.detach()
    keep = max(1, x.shape[1] // 2)
    try:
        with torch.no_grad():
            part = call.module(x[:, :keep])
    except Exception:  # a module that cannot take fewer tokens is not per-token
        return False
    return isinstance(part, Tensor) and same_output(part, call.output[:, :keep].detach())


def _after_blocks(probe: Probe, last: Call) -> list[Call]:
    """Per-token modules applied one after another to the last block's output."""
    chain, current, busy_until = [], last.output, last.end
    for call in probe.calls[last.end :]:
        if call.start < busy_until or call.input is not current:
            continue
        if keeps_stream(call) and _per_token(call):
            chain.append(call)
            current, busy_until = call.output, call.end
    return chain


def _read(model: nn.Module, probed: nn.Module, stack: Stack, probe: Probe, who: str) -> Structure:
    calls = [probe.named(u)[0] for u in stack.units]
    tokens_in = calls[0].input
    tokens, channels = int(tokens_in.shape[1]), int(tokens_in.shape[2])
    prefix = _prefix(tokens_in, who)
    found = (
        f"{len(stack.units)} blocks {stack.units[0]!r}..{stack.units[-1]!r} of {tokens} tokens x {channels} "
        f"channels, {prefix} prefix"
    )
    chain = _after_blocks(probe, calls[-1])
    point = chain[-1] if chain else calls[-1]
    readout = classify(read_rows(probe.output, point.output), prefix)
    if readout.pool is None:
        raise _reads_every_token(who, found, readout.why)
    replacement = mean_replacement if readout.pool is Pool.AVG else kept_replacement
    what_if = run(probed, probe.size, {point.name: lambda out: replacement(out, prefix)})
    if not same_output(what_if.output, probe.output):
        why = (
            "its output reads the image tokens through more than their mean (a sum, a maximum, or their count)"
            if readout.pool is Pool.AVG
            else "its output changes when image tokens it does not read are removed"
        )
        raise _reads_every_token(who, found, why)
    if readout.pool is Pool.AVG and len(chain) > 1:
        names = [c.name for c in chain]
        raise UnsupportedModelError(
            f"{who}: discovered {found}; its output averages the image tokens after {len(chain)} per-token modules "
            f"{names}; expected at most one (a final norm) between the last block and the average"
        )
    size = probe.size
    inside = sum(c.flops for c in calls)
    return Structure(
        model=who,
        units=stack.units,
        runner=stack.runner if probed is not model else None,
        tokens=tokens,
        channels=channels,
        prefix=prefix,
        grid=_grid(probe, calls[0], tokens - prefix),
        in_chans=size[0],
        input_size=(size[1], size[2]),
        pool=readout.pool,
        class_token=prefix > 0,
        final_norm=chain[0].name if chain else None,
        outside_macs=(probe.total_flops - inside) // 4,  # FLOPs -> MACs, two images
        leaf_types=_mode_dependent(model, stack.units),
    )


def _reads_every_token(who: str, found: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{who}: discovered a vision transformer ({found}), but {why}, and EViT drops and fuses tokens; "
        "expected an output that reads only the class token(s) or the mean of the image tokens "
        f"(to support it anyway, see {GUIDE})"
    )


def _mode_dependent(model: nn.Module, units: tuple[str, ...]) -> tuple[type[nn.Module], ...]:
    """Parameter-free helper modules whose ``forward`` reads ``self.training`` (drop-path): traced
    through, they would bake eval mode into the graph, so they stay leaves."""
    found = []
    for unit in units:
        for module in model.get_submodule(unit).modules():
            cls = type(module)
            if cls in found or cls.__module__.startswith("torch.") or next(module.parameters(), None) is not None:
                continue
            try:
                source = inspect.getsource(cls.forward)
            except (OSError, TypeError):
                continue
            if "self.training" in source:
                found.append(cls)
    return tuple(found)
