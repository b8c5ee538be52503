"""Hugging Face transformers DINOv2, with and without registers (transformers 5.x; optional).

A ``Dinov2Layer`` is a pre-norm block with LayerScale (``layer_scale1``/``layer_scale2``) and an
MLP or SwiGLU; its attention is re-expressed by
:func:`~evit_patch.families.hf_common.prepare_layer`, as for transformers' ViT. Register tokens sit
between [CLS] and the image tokens: they are prefix tokens, never dropped. ``Dinov2Model``'s
``pooler_output`` is [CLS] after ``layernorm``; ``Dinov2ForImageClassification`` also averages the
image tokens, so a fused token counts there as the tokens it stands for (``pool() == "avg"``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..options import Pool
from .hf_common import TransformersFamily, check_class, check_encoder, full_name, outside_macs, prepare_layer
from .registry import register_family

_PLAIN = "transformers.models.dinov2.modeling_dinov2.Dinov2"
_REGISTERS = "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegisters"
_BACKBONES = {f"{_PLAIN}Backbone"}
"""Feature-map backbones: every patch's feature at chosen layers, served restored (``dense=True``)."""
_HEADS = {
    f"{_PLAIN}Backbone": Pool.TOKEN,
    f"{_PLAIN}Model": Pool.TOKEN,
    f"{_PLAIN}ForImageClassification": Pool.AVG,
    f"{_REGISTERS}Model": Pool.TOKEN,
    f"{_REGISTERS}ForImageClassification": Pool.AVG,
}
"""Supported classes and their pools: [CLS] alone, or [CLS] beside the mean of the image tokens."""
_BASES = {f"{_PLAIN}PreTrainedModel", f"{_REGISTERS}PreTrainedModel"}
_ATTENTION = (f"{_PLAIN}Attention", f"{_REGISTERS}Attention")


@register_family
class HFDinov2(TransformersFamily):
    name = "transformers.Dinov2"
    notes = (
        "Dinov2Model, Dinov2ForImageClassification and their WithRegisters versions (registers are prefix "
        "tokens, never dropped; the classifier's mean counts a fused token as the patches it stands for), "
        "and Dinov2Backbone (feature maps restored to every patch, dense=True); "
        'attn_implementation "sdpa" or "eager"; planned at the configured input size; pooler_output as '
        "before, last_hidden_state holds the surviving tokens only; output_hidden_states with dense=True "
        "(every layer restored to the full grid); no output_attentions"
    )

    classes = frozenset(_BASES)
    size_note = "explain and budgets count its tokens at that size"

    def check(self, model: nn.Module) -> None:
        check_class(model, _HEADS, "the classes evit_patch knows the outputs of")
        check_encoder(model, self.blocks(model), "attention", _ATTENTION)

    def blocks(self, model: nn.Module) -> Sequence[tuple[str, nn.Module]]:
        return [
            (f"{self._prefix(model)}encoder.layer.{name}", layer)
            for name, layer in self._layers(model).named_children()
        ]

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1 + int(getattr(model.config, "num_register_tokens", 0))

    def pool(self, model: nn.Module) -> Pool:
        return _HEADS[full_name(type(model))]

    def encoder(self, model: nn.Module) -> str:
        """``Dinov2Model`` and ``Dinov2Backbone`` hand on the hidden states their encoder returns."""
        return f"{self._prefix(model)}encoder"

    def feature_maps(self, model: nn.Module) -> bool:
        return full_name(type(model)) in _BACKBONES

    def token_outputs(self, model: nn.Module) -> tuple[str, ...]:
        """A backbone's feature maps and hidden states are restored to every patch: every shape is the original's."""
        return () if self.feature_maps(model) else super().token_outputs(model)

    def final_norm(self, model: nn.Module) -> str:
        return f"{self._prefix(model)}layernorm"

    def outside_macs(self, model: nn.Module, img_size=None) -> int:
        embeddings = model.base_model.embeddings
        weight = embeddings.patch_embeddings.projection.weight
        return outside_macs(model, embeddings, self._layers(model), self._size(model, img_size), weight)

    def prepare_block(self, block: nn.Module) -> nn.Module:
        return prepare_layer(block, "attention")

    def leaf_types(self) -> tuple[type[nn.Module], ...]:
        from transformers.models.dinov2.modeling_dinov2 import Dinov2DropPath
        from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
            Dinov2WithRegistersDropPath,
        )

        return (Dinov2DropPath, Dinov2WithRegistersDropPath)

    @staticmethod
    def _prefix(model: nn.Module) -> str:
        return "" if model.base_model is model else f"{model.base_model_prefix}."

    @staticmethod
    def _layers(model: nn.Module) -> nn.Module:
        return model.base_model.encoder.layer
