"""Trace one transformer block into an fx graph the locator and rewriter can work on.

Blocks are traced one at a time, not the whole model: the patched model stays an instance of
the user's class (``forward_features``, ``reset_classifier``, ``pretrained_cfg`` all keep
working), its ``state_dict`` keys are unchanged, and models whose embedding does not trace
(dynamic image size) are still covered.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import UnsupportedInputError, UnsupportedModelError
from ..opaque import RUNTIME_GUARDS, autowrap_modules, is_opaque_leaf, known_length, runtime_guard
from ..token_state import STATE_MODULES
from .reorganizer import TokenReorganizer


@runtime_guard
@fx.wrap
def require_default(value: Any, default: Any, message: str) -> None:
    """Runtime guard for a block argument that tracing specialised to its default."""
    if value is default or (not isinstance(value, torch.Tensor) and value == default):
        return
    raise UnsupportedInputError(message)


class BlockTracer(fx.Tracer):
    """``fx.Tracer`` that keeps mode-dependent helpers (drop-path) and our own modules as leaves.

    A traced-through drop-path would bake ``self.training`` into the graph; as a leaf it keeps
    following ``.train()``/``.eval()``. einops functions stay opaque calls and its layers leaves,
    and so do peft's adapter layers (see :func:`~evit_patch.opaque.is_opaque_leaf`).
    """

    def __init__(self, leaf_types: Iterable[type[nn.Module]] = ()) -> None:
        # Pickle rebuilds a GraphModule by re-tracing its code with a subclass of this tracer.
        super().__init__(autowrap_modules=autowrap_modules(), autowrap_functions=tuple(RUNTIME_GUARDS))
        self.leaf_types = (TokenReorganizer, *STATE_MODULES, *leaf_types)

    def iter(self, obj: fx.Proxy):
        count = known_length(obj.node)
        return iter([obj[i] for i in range(count)]) if count is not None else super().iter(obj)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or is_opaque_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def trace_block(
    block: nn.Module,
    *,
    where: str,
    leaf_types: Iterable[type[nn.Module]] = (),
    live: Iterable[str] = (),
) -> fx.GraphModule:
    """Symbolically trace ``block`` (in eval mode) with every argument after the first at its default.

    Args:
        block: the transformer block; called as ``block(x)`` by its model.
        where: ``"ModelClass.blocks.3"``, used in every message.
        leaf_types: extra module types not to trace through.
        live: arguments the model always passes (a rotary table) that stay graph inputs.

    Raises:
        UnsupportedModelError: the block needs more than one input or fails to trace.
    """
    params = list(inspect.signature(block.forward).parameters.values())
    if not params:
        raise UnsupportedModelError(f"{where}: forward() takes no token input")
    required = [
        p.name
        for p in params[1:]
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if required:
        raise UnsupportedModelError(
            f"{where}: expected a block called as block(x), but forward() also requires {required}"
        )
    live = set(live)
    missing = live - {p.name for p in params}
    if missing:
        raise UnsupportedModelError(f"{where}: expected forward() to take {sorted(missing)}")
    defaults = {
        p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty and p.name not in live
    }
    was_training = block.training
    block.eval()
    try:
        graph = BlockTracer(leaf_types).trace(block, concrete_args=defaults)
    except Exception as exc:  # fx raises many types; the cause is chained for the details
        raise UnsupportedModelError(f"{where}: torch.fx could not trace {type(block).__name__}: {exc}") from exc
    finally:
        block.train(was_training)
    named = [p.name for p in params[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    _install_default_guards(graph, named, defaults, where)
    gm = fx.GraphModule(block, graph, class_name=type(block).__name__)
    _keep_module_order(gm, block)
    _constants_not_persistent(gm)
    gm.train(was_training)
    return gm


def _install_default_guards(graph: fx.Graph, names: list[str], defaults: dict[str, Any], where: str) -> None:
    """Replace fx's anonymous specialisation asserts with one named guard per argument.

    fx renames specialised placeholders (``attn_mask`` -> ``attn_mask_1``), so a caller passing
    ``attn_mask=...`` would get a bare ``TypeError``; restore the names and say why instead.
    """
    # ``**kwargs`` stays a live input (its placeholder target starts with "**"): a family guards it.
    placeholders = [n for n in graph.nodes if n.op == "placeholder" and not n.target.startswith("*")][1:]
    for node, name in zip(placeholders, names):
        if name not in defaults:
            continue
        default = defaults[name]
        _erase_users(node)
        node.target = name
        with graph.inserting_after(node):
            graph.call_function(
                require_default,
                (
                    node,
                    default,
                    (
                        f"{where} was patched by evit_patch with {name}={default!r}; EViT reorders and "
                        f"drops tokens, so it cannot honour a caller-supplied {name}"
                    ),
                ),
            )


def _erase_users(node: fx.Node) -> None:
    for user in list(node.users):
        _erase_users(user)
        user.graph.erase_node(user)


def _constants_not_persistent(gm: fx.GraphModule) -> None:
    """fx stores tensors computed from buffers at trace time (BEiT's ``relative_position_index.view(-1)``)
    as ``_tensor_constant<i>`` buffers; keep them out of ``state_dict`` so its keys stay the original's."""
    for module in gm.modules():
        for name in [n for n in module._buffers if n.startswith("_tensor_constant")]:
            module.register_buffer(name, module._buffers.pop(name), persistent=False)


def _keep_module_order(gm: fx.GraphModule, block: nn.Module) -> None:
    """Register submodules in the block's order, not fx's order of first use, so the patched
    model's ``state_dict`` lists its keys as the original does (transformers declares attention
    before the norm that feeds it)."""
    for name, module in gm.named_modules():
        original = block.get_submodule(name) if name else block
        order = {key: i for i, key in enumerate(original._modules)}
        module._modules = dict(sorted(module._modules.items(), key=lambda item: order.get(item[0], len(order))))
