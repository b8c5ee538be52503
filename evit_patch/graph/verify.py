"""The pipeline's last step: run the patched model once on fake tensors and check its token counts.

``explain``, budgets and calibration count tokens analytically (``reorganize.tokens_after``); the
patched graphs count them by running. Comparing the two at patch time turns any disagreement
between the accounting and the rewrite (a new method, a family whose block drops a token the pass
did not expect) into an error naming the block, instead of wrong MACs or a crash at serving time.
Fake tensors carry shapes only, so the check costs no arithmetic, but faking costs about a
millisecond per operator; a model whose one-image forward is cheaper than that (:func:`runs_cheaply`)
is run for real on one random image instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import VerificationError
from ..families import Family, describe
from .outputs import evaluating

REAL_RUN_MACS = 2_000_000_000
"""Below this many MACs per image (DeiT-Tiny: 1.3e9, DeiT-S: 4.6e9), one real float32 forward on a CPU
core takes less time than the same forward on fake tensors, whose cost is per operator, not per MAC."""


def runs_cheaply(model: nn.Module, macs: int) -> bool:
    """Whether one real forward of ``model`` on one image beats faking it: on an accelerator, or in
    float32/64 on the CPU below :data:`REAL_RUN_MACS` (16-bit CPU kernels are slow, meta runs nothing)."""
    param = next(model.parameters(), None)
    if param is None or param.is_meta:
        return False
    if param.device.type != "cpu":
        return True
    return param.dtype in (torch.float32, torch.float64) and macs < REAL_RUN_MACS


def verify_token_counts(
    patched: nn.Module,
    family: Family,
    expected: Sequence[int],
    *,
    img_size: tuple[int, int] | None = None,
    mode: FakeTensorMode | None = None,
    real: bool = False,
) -> Any:
    """Check that block ``i`` of ``patched`` receives ``expected[i]`` tokens on one fake image (``real``:
    one random image, in eval mode); returns the model's output, whose shapes :mod:`.outputs` checks.

    Raises:
        VerificationError: a block received another count, or the forward failed.
    """
    blocks = family.blocks(patched)
    seen: dict[int, int] = {}

    def recorder(index: int):
        def hook(module, args, kwargs):
            tokens = args[0] if args else next(iter(kwargs.values()))
            seen[index] = int(tokens.shape[1])

        return hook

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, (_, block) in enumerate(blocks)]
    param = next(patched.parameters())
    size = img_size or family.input_size(patched)
    shape = (1, family.in_chans(patched), *size)
    try:
        if real:
            image = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
            with evaluating(patched):
                output = patched(image)
        else:
            mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
            with mode, torch.no_grad():
                output = patched(mode.from_tensor(torch.empty(shape, dtype=param.dtype, device=param.device)))
    except Exception as exc:
        raise VerificationError(
            f"{describe(patched)}: the patched model failed on a {'' if real else 'fake '}{tuple(size)} image while "
            f"checking its token counts: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    for index, (name, _) in enumerate(blocks):
        if seen.get(index) != expected[index]:
            raise VerificationError(
                f"{describe(patched)}.{name}: the patched graph feeds this block {seen.get(index)} tokens, the plan "
                f"(explain) says {expected[index]}; please report this as an evit_patch bug"
            )
    return output
