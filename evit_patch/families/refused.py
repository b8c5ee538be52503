"""Families refused by name until they have their own file: the reason is what users see."""

from __future__ import annotations

from .base import RefusedFamily
from .registry import register_refusal

_HIERARCHICAL = (
    "a hierarchical model: tokens live on a 2-D grid that is pooled or merged between stages, "
    "which a dropped or fused token breaks"
)

register_refusal(
    RefusedFamily(
        "timm.SwinTransformer",
        {
            "timm.models.swin_transformer.SwinTransformer",
            "timm.models.swin_transformer_v2.SwinTransformerV2",
            "timm.models.swin_transformer_v2_cr.SwinTransformerV2Cr",
        },
        "windowed attention on a fixed 2-D token grid with no class token: dropping tokens breaks the windows",
    )
)
register_refusal(
    RefusedFamily(
        "timm.hierarchical",
        {
            "timm.models.pit.PoolingVisionTransformer",
            "timm.models.mvitv2.MultiScaleVit",
            "timm.models.hiera.Hiera",
            "timm.models.twins.Twins",
            "timm.models.levit.Levit",
        },
        f"PiT, MViTv2, Hiera, Twins, LeViT: {_HIERARCHICAL}",
    )
)
register_refusal(
    RefusedFamily(
        "timm.Cait",
        {"timm.models.cait.Cait"},
        "the class token joins only in the last (class-attention) blocks: the blocks before them have "
        "no [CLS] row to rank tokens by, and class attention updates the class token alone",
    )
)
register_refusal(
    RefusedFamily(
        "timm.Xcit",
        {"timm.models.xcit.Xcit"},
        "cross-covariance attention mixes channels, not tokens, and a local patch interaction "
        "convolves the 2-D token grid: neither has a token-to-token attention row or survives dropped tokens",
    )
)
register_refusal(
    RefusedFamily(
        "timm.CrossVit",
        {"timm.models.crossvit.CrossVit"},
        "two token branches at different patch sizes exchange information through their class "
        "tokens in multi-scale blocks, not a single block sequence",
    )
)
register_refusal(
    RefusedFamily(
        "timm.NaFlexVit",
        {"timm.models.naflexvit.NaFlexVit"},
        "variable-length packed sequences with per-sample patch masks: the attention mask depends on the input",
    )
)

# Hugging Face transformers image models other than ViT/DeiT, DINOv2, CLIP and SigLIP (see hf_*.py): matched by
# class path, so transformers need not be installed; each reason names the timm model that works instead.
_HF = "transformers.models"
register_refusal(
    RefusedFamily(
        "transformers.Beit",
        {f"{_HF}.beit.modeling_beit.BeitModel", f"{_HF}.beit.modeling_beit.BeitForImageClassification"},
        "transformers' BEiT adds its relative position bias inside its own attention classes, which "
        "evit_patch does not re-express; load the weights into timm's beit_* (supported) instead",
    )
)
register_refusal(
    RefusedFamily(
        "transformers.Swin",
        {f"{_HF}.swin.modeling_swin.SwinModel", f"{_HF}.swin.modeling_swin.SwinForImageClassification"},
        "windowed attention on a fixed 2-D token grid with no class token: dropping tokens breaks the windows",
    )
)
register_refusal(
    RefusedFamily(
        "transformers.ViTMAE",
        {f"{_HF}.vit_mae.modeling_vit_mae.ViTMAEModel", f"{_HF}.vit_mae.modeling_vit_mae.ViTMAEForPreTraining"},
        "its embeddings mask a random subset of patches on every call; for the fine-tuned encoder use "
        "transformers' ViTForImageClassification or timm's vit_* (both supported)",
    )
)
