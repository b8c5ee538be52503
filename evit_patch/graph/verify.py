"""The pipeline's last step: run the patched model once on fake tensors and check its token counts.

``explain``, budgets and calibration count tokens analytically (``reorganize.tokens_after``); the
patched graphs count them by running. Comparing the two at patch time turns any disagreement
between the accounting and the rewrite (a new method, a family whose block drops a token the pass
did not expect) into an error naming the block, instead of wrong MACs or a crash at serving time.
Fake tensors carry shapes only, so the check costs no arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import VerificationError
from ..families import Family, describe


def verify_token_counts(
    patched: nn.Module,
    family: Family,
    expected: Sequence[int],
    *,
    img_size: tuple[int, int] | None = None,
    mode: FakeTensorMode | None = None,
) -> Any:
    """Check that block ``i`` of ``patched`` receives ``expected[i]`` tokens on one fake image;
    returns the model's (fake) output, whose shapes :mod:`.outputs` checks.

    Raises:
        VerificationError: a block received another count, or the fake forward failed.
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
    try:
        mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
        with mode, torch.no_grad():
            image = mode.from_tensor(
                torch.empty(1, family.in_chans(patched), *size, dtype=param.dtype, device=param.device)
            )
            output = patched(image)
    except Exception as exc:
        raise VerificationError(
            f"{describe(patched)}: the patched model failed on a fake {tuple(size)} image while checking its "
            f"token counts: {type(exc).__name__}: {exc}"
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
