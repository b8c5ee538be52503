"""Hugging Face transformers ``SiglipVisionModel``: the SigLIP image tower (transformers 5.x; optional).

No class token: tokens are ranked by the attention they receive. The pooled embedding
(``pooler_output``) comes from ``head``, a probe that attends over every token through an
``nn.MultiheadAttention``; in the patched copy the final norm passes the tokens' sizes on and the
head adds ``log(size)`` to each token's logit, so a fused or merged token weighs as the tokens it
stands for (:func:`~evit_patch.graph.rewrite.wrap_attention_pool`). The layers are traced as
:func:`~evit_patch.families.hf_common.prepare_layer` re-expresses them, on the same
``q_proj``/``k_proj``/``v_proj``/``out_proj``. transformers is imported only inside methods.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import nn

from ..errors import UnsupportedModelError
from ..options import Pool, Score
from ..token_state import strip
from .base import attention_pool_macs, describe
from .hf_common import TransformersFamily, check_encoder, full_name, outside_macs, prepare_layer
from .registry import register_family

_SIGLIP = "transformers.models.siglip.modeling_siglip"
_MODEL = f"{_SIGLIP}.SiglipVisionModel"
_ATTENTION = (f"{_SIGLIP}.SiglipAttention",)
_HEAD = f"{_SIGLIP}.SiglipMultiheadAttentionPoolingHead"


def _strip_state(module: nn.Module, args, output, *, channels: int):
    """Forward hook: ``last_hidden_state`` without the token-state channels the final norm passed
    on to the head (the head has read them), so it keeps transformers' width."""
    if isinstance(output, tuple):
        return (strip(output[0], channels), *output[1:])
    output.last_hidden_state = strip(output.last_hidden_state, channels)
    return output


@register_family
class HFSiglipVision(TransformersFamily):
    name = "transformers.SiglipVisionModel"
    notes = (
        "SiglipVisionModel with its attention-pooling head (vision_use_head=True), "
        'attn_implementation "sdpa" or "eager": no class token, tokens ranked by the attention they '
        "receive; a fused or merged token weighs as the tokens it stands for in the head's softmax; "
        "fixed input size; no output_attentions/output_hidden_states"
    )

    classes = frozenset({_MODEL})

    def check(self, model: nn.Module) -> None:
        head = getattr(model, "head", None) if model.use_head else None
        if head is None or full_name(type(head)) != _HEAD:
            raise UnsupportedModelError(
                f"{describe(model)} has no attention-pooling head (vision_use_head=False): its only output is "
                "the tokens, which EViT drops and fuses; expected vision_use_head=True"
            )
        check_encoder(model, self.blocks(model), "self_attn", _ATTENTION)

    def blocks(self, model: nn.Module) -> Sequence[tuple[str, nn.Module]]:
        return [(f"encoder.layers.{name}", layer) for name, layer in model.encoder.layers.named_children()]

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def score(self, model: nn.Module) -> Score:
        return Score.RECEIVED

    def pool(self, model: nn.Module) -> Pool:
        return Pool.ATTENTION

    def pool_module(self, model: nn.Module) -> str:
        return "head"

    def pool_macs_per_token(self, model: nn.Module) -> int:
        return attention_pool_macs(model.head, self.channels(model))[1]

    def final_norm(self, model: nn.Module) -> str:
        return "post_layernorm"

    def confine_state(self, model: nn.Module) -> None:
        model.register_forward_hook(functools.partial(_strip_state, channels=self.channels(model)))

    def outside_macs(self, model: nn.Module, img_size=None) -> int:
        """The embedding, counted by running it, and the head's part that does not scale with the tokens."""
        embeddings, channels = model.embeddings, self.channels(model)
        size, weight = self._size(model, img_size), embeddings.patch_embedding.weight
        inside = nn.ModuleList([model.encoder.layers, model.head])  # the head is counted below
        return outside_macs(model, embeddings, inside, size, weight) + attention_pool_macs(model.head, channels)[0]

    def prepare_block(self, block: nn.Module) -> nn.Module:
        return prepare_layer(block, "self_attn", output="out_proj", scaling="scale")
