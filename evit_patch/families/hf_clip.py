"""Hugging Face transformers CLIP vision towers (transformers 5.x; optional).

``CLIPVisionModel`` embeds, applies ``pre_layrnorm``, runs its ``CLIPEncoderLayer`` blocks and
returns their tokens as ``last_hidden_state``; ``pooler_output`` is ``post_layernorm`` of the
class token alone (``CLIPVisionModelWithProjection`` projects it to ``image_embeds``). No
per-token module follows the last block, so :meth:`HFCLIPVision.final_norm` is ``None``: the last
block returns bare tokens, whose positions and sizes nothing after it reads. The attention is
re-expressed by :func:`~evit_patch.families.hf_common.prepare_layer` on the same
``q_proj``/``k_proj``/``v_proj``/``out_proj``. ``CLIPModel`` users patch its ``vision_model``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import UnsupportedModelError
from .base import describe
from .hf_common import TransformersFamily, check_encoder, full_name, outside_macs, prepare_layer
from .registry import register_family

_CLIP = "transformers.models.clip.modeling_clip"
_SUPPORTED = {f"{_CLIP}.CLIPVisionModel", f"{_CLIP}.CLIPVisionModelWithProjection"}
_CLASSIFIER = f"{_CLIP}.CLIPForImageClassification"
_ATTENTION = (f"{_CLIP}.CLIPAttention",)


@register_family
class HFCLIPVision(TransformersFamily):
    name = "transformers.CLIPVision"
    notes = (
        "CLIPVisionModel, CLIPVisionModelWithProjection (for a CLIPModel, patch its vision_model), "
        'attn_implementation "sdpa" or "eager"; fixed input size; pooler_output and image_embeds as before, '
        "last_hidden_state holds the surviving tokens only; no output_attentions/output_hidden_states"
    )

    classes = frozenset({*_SUPPORTED, _CLASSIFIER})

    def check(self, model: nn.Module) -> None:
        if full_name(type(model)) not in _SUPPORTED:
            raise UnsupportedModelError(
                f"{describe(model)} is not supported by evit_patch: its classifier averages the last layer's "
                "tokens with no per-token module in between, where a fused token would have to count as the "
                "tokens it stands for; expected CLIPVisionModel or CLIPVisionModelWithProjection (patch "
                "model.vision_model for its class-token embedding)"
            )
        check_encoder(model, self.blocks(model), "self_attn", _ATTENTION)

    def blocks(self, model: nn.Module) -> Sequence[tuple[str, nn.Module]]:
        prefix = "" if model.base_model is model else f"{model.base_model_prefix}."
        return [(f"{prefix}encoder.layers.{name}", layer) for name, layer in self._layers(model).named_children()]

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1

    def final_norm(self, model: nn.Module) -> None:
        return None  # post_layernorm reads the class token alone

    def outside_macs(self, model: nn.Module, img_size=None) -> int:
        embeddings = model.base_model.embeddings
        weight = embeddings.patch_embedding.weight
        return outside_macs(model, embeddings, self._layers(model), self._size(model, img_size), weight)

    def prepare_block(self, block: nn.Module) -> nn.Module:
        return prepare_layer(block, "self_attn", output="out_proj", scaling="scale")

    @staticmethod
    def _layers(model: nn.Module) -> nn.Module:
        return model.base_model.encoder.layers
