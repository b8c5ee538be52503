"""The block stack of an unknown model, from one hooked forward (``probe.py``): no names read.

A module "keeps the stream" when it maps a ``(batch, tokens, channels)`` tensor to one of the same
shape (a block, its attention, its MLP, a norm). For each class of such modules called once each,
every module's *unit* is its highest ancestor that holds no other module of that class (a timm
``Block``, or the ``[Attention, FeedForward]`` pair of vit-pytorch); units of one type under one
parent, run one after another, with an attention op in each, form a stack. The longest stack is
the model's blocks. A unit that is called, and receives the previous unit's output, is a block as
it is; otherwise its residual adds live in the module that runs the units (``restructure.py``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from torch import nn

from .probe import Call, Probe


@dataclass(frozen=True)
class Stack:
    """The blocks found: qualified names in execution order."""

    units: tuple[str, ...]
    called: bool
    """Each unit is a module called on the previous unit's output (a block as it is)."""
    runner: str | None
    """Split units: the nearest called module above them, whose ``forward`` holds their residual adds."""


def keeps_stream(call: Call) -> bool:
    x, y = call.input, call.output
    return x is not None and y is not None and x.dim() == 3 and x.shape[1] > 1 and y.shape == x.shape


def _unit(name: str, members: set[str]) -> str:
    """The highest ancestor of ``name`` (below the root) that holds no other member."""
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if not any(m != name and (m == prefix or m.startswith(prefix + ".")) for m in members):
            return prefix
    return name


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _runs(units: list[str], model: nn.Module) -> list[list[str]]:
    """Maximal runs of consecutive units of one type under one parent."""
    runs: list[list[str]] = []
    for unit in units:
        key = (_parent(unit), type(model.get_submodule(unit)))
        if runs and runs[-1][-1] != unit and (_parent(runs[-1][-1]), type(model.get_submodule(runs[-1][-1]))) == key:
            runs[-1].append(unit)
        elif not runs or runs[-1][-1] != unit:
            runs.append([unit])
    return runs


def find_stack(model: nn.Module, probe: Probe) -> Stack | None:
    """The longest stack of units that each hold an attention op, or ``None``."""
    counts = Counter(c.name for c in probe.calls)
    by_class: dict[type, list[str]] = defaultdict(list)
    for call in probe.calls:
        if call.name and counts[call.name] == 1 and keeps_stream(call):
            by_class[type(call.module)].append(call.name)
    best: list[str] = []
    for names in by_class.values():
        if len(names) < 2:
            continue
        members = set(names)
        for run in _runs([_unit(n, members) for n in names], model):
            attends = all(any(c.attention for c in probe.within(u)) for u in run)
            if attends and len(set(run)) == len(run) and len(run) > len(best):
                best = run
    if not best:
        return None
    return Stack(tuple(best), _chained(probe, best), _runner(probe, best))


def _chained(probe: Probe, units: list[str]) -> bool:
    calls = [probe.named(u) for u in units]
    if any(len(c) != 1 for c in calls):
        return False
    return all(keeps_stream(c[0]) for c in calls) and all(
        nxt[0].input is prev[0].output for prev, nxt in zip(calls, calls[1:])
    )


def _runner(probe: Probe, units: list[str]) -> str | None:
    called = {c.name for c in probe.calls}
    parent = _parent(units[0])
    while parent and parent not in called:
        parent = _parent(parent)
    return parent if parent in called else None
