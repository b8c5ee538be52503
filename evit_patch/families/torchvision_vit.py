"""torchvision's ``VisionTransformer`` (``vit_b_16``, ``vit_l_32``, ``vit_h_14``, ...).

Its blocks call ``nn.MultiheadAttention``, an opaque leaf whose q and k never reach the traced
graph. Before tracing, each block's attention is swapped (in the copy being patched) for
:class:`~evit_patch.families.mha.SDPAMultiheadAttention`, which computes the same attention with
``scaled_dot_product_attention`` from the same ``in_proj``/``out_proj`` parameters, so the
structural locator sees q and k and the state-dict keys stay torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import CheckpointError, UnsupportedModelError
from .base import Family, Recipe, describe
from .mha import check_multihead_attention, with_sdpa_attention
from .registry import register_family

_CLASS = "torchvision.models.vision_transformer.VisionTransformer"


@register_family
class TorchvisionVisionTransformer(Family):
    name = "torchvision.VisionTransformer"
    notes = (
        "vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14: nn.MultiheadAttention re-expressed with SDPA "
        "on the same parameters (keep=1.0 matches to float rounding, not bitwise); fixed input size"
    )

    classes = frozenset({_CLASS})

    def check(self, model: nn.Module) -> None:
        for name, block in self.blocks(model):
            check_multihead_attention(block.self_attention, f"{describe(model)}.{name}.self_attention")

    def blocks(self, model: nn.Module) -> Sequence[tuple[str, nn.Module]]:
        return [(f"encoder.layers.{name}", block) for name, block in model.encoder.layers.named_children()]

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1  # torchvision's ViT always has a class token and its head always reads it

    def final_norm(self, model: nn.Module) -> str:
        return "encoder.ln"

    def recipe(self, model: nn.Module, architecture: str | None = None, model_kwargs: dict | None = None) -> Recipe:
        """``torchvision.models.VisionTransformer``'s constructor arguments, read off the model
        (``vit_b_16`` and its siblings are that class with these arguments)."""
        layers = model.encoder.layers
        kwargs = {
            "image_size": int(model.image_size),
            "patch_size": int(model.patch_size),
            "num_layers": len(layers),
            "num_heads": int(layers[0].self_attention.num_heads),
            "hidden_dim": int(model.hidden_dim),
            "mlp_dim": int(model.mlp_dim),
            "dropout": float(model.dropout),
            "attention_dropout": float(model.attention_dropout),
            "num_classes": int(model.num_classes),
            "representation_size": model.representation_size,
        }
        return Recipe(architecture or _CLASS, {**kwargs, **(model_kwargs or {})})

    def rebuild(self, recipe: Recipe, where: str) -> nn.Module:
        from torchvision.models import VisionTransformer

        if recipe.architecture != _CLASS:
            raise CheckpointError(f"{where}: expected architecture {_CLASS!r}, got {recipe.architecture!r}")
        try:
            return VisionTransformer(**recipe.model_kwargs)
        except TypeError as exc:
            raise CheckpointError(
                f"{where}: {_CLASS} cannot take 'model_kwargs' {recipe.model_kwargs} ({exc})"
            ) from exc

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        return int(model.image_size), int(model.image_size)

    def in_chans(self, model: nn.Module) -> int:
        return int(model.conv_proj.in_channels)

    def patch_grid(self, model: nn.Module, img_size=None) -> tuple[int, int]:
        self._check_size(model, img_size)
        side = int(model.image_size) // int(model.patch_size)
        return side, side

    def channels(self, model: nn.Module) -> int:
        return int(model.hidden_dim)

    def _check_size(self, model: nn.Module, img_size) -> None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size or ())
        if img_size is not None and size != (model.image_size, model.image_size):
            raise UnsupportedModelError(
                f"{describe(model)} only accepts {model.image_size}x{model.image_size} images "
                f"(its forward asserts it); got img_size={img_size!r}"
            )

    def num_tokens(self, model: nn.Module, img_size=None) -> int:
        self._check_size(model, img_size)
        return int(model.seq_length)

    def outside_macs(self, model: nn.Module, img_size=None) -> int:
        self._check_size(model, img_size)
        param = model.class_token
        image = torch.zeros(1, 3, model.image_size, model.image_size, device=param.device, dtype=param.dtype)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model._process_input(image)
        heads = sum(m.in_features * m.out_features for m in model.heads.modules() if isinstance(m, nn.Linear))
        return counter.get_total_flops() // 2 + heads

    def resized(self, model: nn.Module, img_size) -> nn.Module:
        self._check_size(model, img_size)
        return model

    def prepare_block(self, block: nn.Module) -> nn.Module:
        return with_sdpa_attention(block, "self_attention")
