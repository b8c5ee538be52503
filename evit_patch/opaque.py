"""Functions a traced block calls as opaque graph nodes (runtime guards, ``None``-aware helpers).

Kept at the bottom of the package: the graph pass registers them with every tracer, and families
that re-express a library's layers use them too.
"""

from __future__ import annotations

RUNTIME_GUARDS: list = []
"""Functions every :class:`~evit_patch.graph.trace.BlockTracer` keeps opaque."""


def runtime_guard(fn):
    """Let every block tracer keep ``fn`` opaque, also when pickle re-traces a patched block's
    generated code, where ``fx.wrap`` (per defining module, still needed for the first trace) does not reach."""
    RUNTIME_GUARDS.append(fn)
    return fn


def autowrap_modules() -> tuple:
    """Python modules whose functions every tracer keeps opaque: ``math`` (fx's default) and, when
    installed, ``einops`` (``rearrange``/``repeat``/``reduce``/``einsum`` cannot run on fx proxies;
    as graph nodes they run on the real tensors)."""
    import math

    try:
        import einops
    except ImportError:  # einops is optional: models that use it bring it
        return (math,)
    return (math, einops)


def is_opaque_leaf(module) -> bool:
    """Modules every tracer keeps as leaves: einops layers (``Rearrange``, ``Reduce``: their
    recipes are chosen from the input's rank, which a proxy does not have) and peft's adapter
    layers (LoRA: their ``forward`` loops over the active adapters, a projection as a whole)."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__}
    return bool(names & _LEAF_CLASSES)


_LEAF_CLASSES = {
    "einops.layers.RearrangeMixin",
    "einops.layers.ReduceMixin",
    "peft.tuners.tuners_utils.BaseTunerLayer",
}


def known_length(node) -> int | None:
    """How many values an fx node's result holds when its call says so (``x.chunk(3)``,
    ``x.split([a, b])``): a tracer can then iterate the proxy (``map(f, x.chunk(3))``), which fx
    only does for a tuple unpacking it can see in the bytecode."""
    import torch

    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or name not in ("chunk", "split"):
        return None
    if node.op == "call_function" and node.target not in (torch.chunk, torch.split, torch.Tensor.chunk):
        return None
    given = node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections"))
    pieces = node.args[1] if len(node.args) > 1 else given
    if name == "chunk" and isinstance(pieces, int):
        return pieces
    if name == "split" and isinstance(pieces, (list, tuple)):
        return len(pieces)
    return None
