"""Hugging Face transformers ``ViT*`` and ``DeiT*`` image models (transformers 5.x; optional).

Their layers are traced as :func:`~evit_patch.families.hf_common.prepare_layer` re-expresses them
(in a throwaway copy of each layer): the attention without transformers' registry dispatch, on
the same ``q_proj``/``k_proj``/``v_proj``/``o_proj`` modules, and the layer's ``forward`` without
the ``GradientCheckpointingLayer`` wrapper. transformers is imported only inside methods: matching
is by class path.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .hf_common import (
    TransformersFamily,
    check_class,
    check_encoder,
    full_name,
    outside_macs,
    prepare_layer,
)
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
_ATTENTION = (f"{_VIT}.ViTAttention", f"{_DEIT}.DeiTAttention")


@register_family
class HFVisionTransformer(TransformersFamily):
    name = "transformers.ViT"
    notes = (
        "ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification(WithTeacher), "
        'attn_implementation "sdpa" or "eager"; fixed input size; no output_attentions/output_hidden_states'
    )

    classes = frozenset({*_BASES})

    def check(self, model: nn.Module) -> None:
        check_class(
            model,
            _PREFIX_TOKENS,
            "a head that reads the class token; masked-image-modeling heads reshape every image token into a grid",
        )
        check_encoder(model, self.blocks(model), "attention", _ATTENTION)

    def blocks(self, model: nn.Module) -> Sequence[tuple[str, nn.Module]]:
        base = model.base_model
        prefix = "" if base is model else f"{model.base_model_prefix}."
        return [(f"{prefix}layers.{name}", layer) for name, layer in base.layers.named_children()]

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return _PREFIX_TOKENS[full_name(type(model))]

    def final_norm(self, model: nn.Module) -> str:
        return "layernorm" if model.base_model is model else f"{model.base_model_prefix}.layernorm"

    def outside_macs(self, model: nn.Module, img_size=None) -> int:
        """The embedding, counted by running it; every Linear outside the layers reads one token."""
        base = model.base_model
        weight = base.embeddings.patch_embeddings.projection.weight
        return outside_macs(model, base.embeddings, base.layers, self._size(model, img_size), weight)

    def prepare_block(self, block: nn.Module) -> nn.Module:
        return prepare_layer(block, "attention")
