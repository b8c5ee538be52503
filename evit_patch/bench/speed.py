"""Fair speed comparison of two models in one process: interleaved rounds, warm-up discarded.

Interleaving means drift on a shared machine (thermal, other jobs) hits both models alike, so
the ratio is far steadier than either absolute time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm


@dataclass(frozen=True)
class SpeedComparison:
    batch_size: int
    seconds_original: float
    """Median seconds per forward pass."""
    seconds_patched: float
    speedup_spread: tuple[float, float]
    """Lowest and highest per-round speedup."""

    @property
    def speedup(self) -> float:
        return self.seconds_original / self.seconds_patched

    def throughput(self, patched: bool) -> float:
        """Images per second."""
        return self.batch_size / (self.seconds_patched if patched else self.seconds_original)


def _time_once(model: nn.Module, x: torch.Tensor) -> float:
    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(x)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    model(x)
    return time.perf_counter() - begin


@torch.inference_mode()
def compare_speed(
    original: nn.Module,
    patched: nn.Module,
    x: torch.Tensor,
    *,
    rounds: int = 10,
    warmup: int = 2,
    progress: bool = True,
) -> SpeedComparison:
    """Median forward time of each model on ``x`` over ``rounds`` interleaved rounds."""
    for _ in range(warmup):
        original(x)
        patched(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    times_a, times_b = [], []
    for index in tqdm(range(rounds), desc=f"timing batch {len(x)}", disable=not progress):
        pair = (original, patched) if index % 2 == 0 else (patched, original)
        first, second = (_time_once(m, x) for m in pair)
        a, b = (first, second) if index % 2 == 0 else (second, first)
        times_a.append(a)
        times_b.append(b)
    ratios = [a / b for a, b in zip(times_a, times_b)]
    return SpeedComparison(len(x), statistics.median(times_a), statistics.median(times_b), (min(ratios), max(ratios)))


def time_interleaved(
    runners: dict[str, Callable[[], object]],
    *,
    rounds: int = 10,
    warmup: int = 2,
    settle: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds of each zero-argument ``runner`` over ``rounds`` rounds; each round calls every
    runner, starting one later each round, so drift hits them alike. CPU only (no device sync).

    ``settle`` untimed calls precede each timed one: runtimes whose idle threads spin for a while
    (OpenMP, onnxruntime) would otherwise bill that spinning to the runner timed next.
    ``clock=time.thread_time`` times single-threaded runners in CPU time, which other processes
    on a shared host barely disturb.
    """
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            for _ in range(settle):
                runners[name]()
            begin = clock()
            runners[name]()
            times[name].append(clock() - begin)
    return {name: statistics.median(values) for name, values in times.items()}
