"""Peak memory of one forward pass: CUDA allocator peak on GPU, resident-set growth on CPU."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


_M_MMAP_THRESHOLD = -3


@functools.cache
def _return_freed_memory_to_the_os() -> bool:
    """Make glibc serve large blocks by mmap (freed at once) so RSS tracks live tensors.

    glibc raises its mmap threshold after the first large free, after which freed activations
    stay in the heap and RSS stops moving. Fixing the threshold keeps the measurement honest.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 64 * 1024))
    except (OSError, AttributeError):
        return False


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes the call adds at its peak over what was resident before; ``None`` if unmeasurable.

    On CPU this resets Linux's high-water mark (``clear_refs``) and reads ``VmHWM`` after the
    call, so it only counts memory the process had to grow by: freed-and-reused allocator memory
    is invisible, which makes it a lower bound; glibc is set to return large blocks at once.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    _return_freed_memory_to_the_os()
    try:
        _CLEAR_REFS.write_text("5")
        base = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - base) * 1024
    except (OSError, KeyError):
        return None
