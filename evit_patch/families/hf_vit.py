"""Hugging Face transformers ``ViT*`` and ``DeiT*`` image models (transformers 5.x; optional).

Two things keep their layers from tracing, and :meth:`HFVisionTransformer.prepare_block` removes
both in a throwaway copy of each layer: the attention dispatches through transformers' attention
registry (opaque to fx), so it is swapped for :class:`TraceableAttention`, which runs the same
``q_proj``/``k_proj``/``v_proj``/``o_proj`` modules through ``scaled_dot_product_attention``
("sdpa") or the model file's own ``eager_attention_forward`` ("eager"); and the layer's
``forward`` is wrapped by ``GradientCheckpointingLayer`` into ``(*args, **kwargs)``, so the copy
calls the unwrapped one. transformers is imported only inside methods: matching is by class path.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import UnsupportedInputError, UnsupportedModelError
from ..graph.trace import runtime_guard
from .base import Family, class_path, describe
from .registry import register_family

_VIT, _DEIT = "transformers.models.vit.modeling_vit", "transformers.models.deit.modeling_deit"
_PREFIX_TOKENS = {
    f"{_VIT}.ViTModel": 1,
    f"{_VIT}.ViTForImageClassification": 1,
    f"{_DEIT}.DeiTModel": 2,
    f"{_DEIT}.DeiTForImageClassification": 2,
    f"{_DEIT}.DeiTForImageClassificationWithTeacher": 2,
}
"""Supported classes and their prefix tokens: [CLS] (+ DeiT's distillation token, always present)."""
_BASES = {f"{_VIT}.ViTPreTrainedModel", f"{_DEIT}.DeiTPreTrainedModel"}
_ATTENTION = {f"{_VIT}.ViTAttention", f"{_DEIT}.DeiTAttention"}
_IMPLEMENTATIONS = ("sdpa", "eager")
_OUTPUT_OPTIONS = ("output_attentions", "output_hidden_states")


def _full_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class TraceableAttention(nn.Module):
    """``ViTAttention``/``DeiTAttention`` without the registry dispatch, on the same Linear modules.

    Holds the very same ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` objects, so parameter
    names are transformers'. Attention dropout is off (the layer is traced in eval mode).
    """

    def __init__(self, attention: nn.Module, implementation: str) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.o_proj,
        )
        self.head_dim, self.scaling, self.implementation = attention.head_dim, attention.scaling, implementation
        # "eager" runs the model file's own function, so it stays what transformers computes.
        self.eager = sys.modules[type(attention).__module__].eager_attention_forward

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
        batch, tokens, _ = hidden_states.shape
        q, k, v = (
            proj(hidden_states).view(batch, tokens, -1, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if self.implementation == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=self.scaling, is_causal=False)
            out = out.transpose(1, 2).contiguous()
        else:
            out, _ = self.eager(self, q, k, v, None, scaling=self.scaling, dropout=0.0)
        return self.o_proj(out.reshape(batch, tokens, -1).contiguous()), None


@runtime_guard
@fx.wrap
def require_no_output_capture(kwargs: dict, where: str) -> None:
    """Runtime guard: transformers records hidden states/attentions with hooks on its layer classes,
    which a patched layer no longer is, so the tuples would silently miss layers."""
    options = kwargs or {}  # fx's Interpreter (shape propagation) passes an empty ``**kwargs`` as []
    requested = [name for name in _OUTPUT_OPTIONS if options.get(name)]
    if requested:
        raise UnsupportedInputError(
            f"{where} was patched by evit_patch: {', '.join(requested)} cannot be honoured (patched layers "
            "are not captured, and later layers see fewer tokens); call without them"
        )


def _traceable_layer(layer: nn.Module, where: str) -> type[nn.Module]:
    """A subclass of the layer's class whose ``forward`` is the unwrapped one, behind the guard."""
    unwrapped = inspect.unwrap(type(layer).forward)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        require_no_output_capture(kwargs, where)
        return unwrapped(self, hidden_states, attention_mask)

    cls = type(type(layer).__name__, (type(layer),), {"__module__": type(layer).__module__})
    cls.forward = forward  # set after creation: __init_subclass__ would wrap it again
    return cls


@register_family
class HFVisionTransformer(Family):
    name = "transformers.ViT"
    notes = (
        "ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification(WithTeacher), "
        'attn_implementation "sdpa" or "eager"; fixed input size; no output_attentions/output_hidden_states'
    )

    classes = frozenset({*_BASES})

    def matches(self, model: nn.Module) -> bool:
        return bool(_BASES & class_path(model))

    def check(self, model: nn.Module) -> None:
        who, config = describe(model), model.config
        if _full_name(type(model)) not in _PREFIX_TOKENS:
            raise UnsupportedModelError(
                f"{who} is not supported by evit_patch: expected one of "
                f"{sorted(n.rsplit('.', 1)[1] for n in _PREFIX_TOKENS)} (a head that reads the class token; "
                "masked-image-modeling heads reshape every image token into a grid)"
            )
        if config._attn_implementation not in _IMPLEMENTATIONS:
            raise UnsupportedModelError(
                f"{who} has attn_implementation={config._attn_implementation!r}; expected one of {_IMPLEMENTATIONS}"
            )
        requested = [name for name in _OUTPUT_OPTIONS if getattr(config, name, False)]
        if requested:
            raise UnsupportedModelError(
                f"{who} has config.{'/'.join(requested)}=True: patched layers are not captured; expected False"
            )
        for name, layer in self.blocks(model):
            found = getattr(layer, "attention", None)
            if found is None or _full_name(type(found)) not in _ATTENTION:
                raise UnsupportedModelError(
                    f"{who}.{name}.attention: expected ViTAttention or DeiTAttention, found {type(found).__name__}"
                )

    def blocks(self, model: nn.Module) -> Sequence[tuple[str, nn.Module]]:
        base = model.base_model
        prefix = "" if base is model else f"{model.base_model_prefix}."
        return [(f"{prefix}layers.{name}", layer) for name, layer in base.layers.named_children()]

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return _PREFIX_TOKENS[_full_name(type(model))]

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        height, width = self._check_size(model, None)
        return int(height), int(width)

    def in_chans(self, model: nn.Module) -> int:
        return int(model.config.num_channels)

    def patch_grid(self, model: nn.Module, img_size=None) -> tuple[int, int]:
        height, width = self._check_size(model, img_size)
        patch = model.config.patch_size
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return height // patch[0], width // patch[1]

    def final_norm(self, model: nn.Module) -> str:
        return "layernorm" if model.base_model is model else f"{model.base_model_prefix}.layernorm"

    def channels(self, model: nn.Module) -> int:
        return int(model.config.hidden_size)

    def _check_size(self, model: nn.Module, img_size) -> tuple[int, int]:
        own = tuple(model.base_model.embeddings.patch_embeddings.image_size)
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size or own)
        if size != own:
            raise UnsupportedModelError(
                f"{describe(model)}: evit_patch patches it at its configured {own[0]}x{own[1]} input only "
                f"(interpolate_pos_encoding is not used); got img_size={img_size!r}"
            )
        return own

    def num_tokens(self, model: nn.Module, img_size=None) -> int:
        self._check_size(model, img_size)
        return int(model.base_model.embeddings.patch_embeddings.num_patches) + self.num_prefix_tokens(model)

    def outside_macs(self, model: nn.Module, img_size=None) -> int:
        """The embedding, counted by running it; every Linear outside the layers reads one token."""
        height, width = self._check_size(model, img_size)
        base = model.base_model
        param = base.embeddings.patch_embeddings.projection.weight
        image = torch.zeros(1, model.config.num_channels, height, width, device=param.device, dtype=param.dtype)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            base.embeddings(image)
        inside = {id(m) for m in base.layers.modules()}
        heads = sum(
            m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in inside
        )
        return counter.get_total_flops() // 2 + heads

    def resized(self, model: nn.Module, img_size) -> nn.Module:
        self._check_size(model, img_size)
        return model

    def prepare_block(self, block: nn.Module) -> nn.Module:
        implementation = block.attention.config._attn_implementation
        prepared = copy.copy(block)
        prepared.__class__ = _traceable_layer(block, type(block).__name__)
        prepared._modules = dict(block._modules)
        prepared.attention = TraceableAttention(block.attention, implementation)
        return prepared
