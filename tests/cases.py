"""The small random-init model of every supported family, in one place: the family table
(``test_families.py``) crosses them with the shared checks in ``tracked.py``, and the family files
use them for what is particular to one family. float64 by default, so top-k ties cannot flake;
the parameters a wrong token, position or pool would barely move at their init are re-drawn."""

from __future__ import annotations

import torch
from conftest import images, make_vit
from tracked import randomise

# --- timm ---


def small_vit(dtype=torch.float64, **kwargs):
    """timm ``VisionTransformer``: 16 image tokens behind a class token, token-pooled."""
    options = dict(img_size=64, depth=4, embed_dim=64, num_heads=4, num_classes=10) | kwargs
    return randomise(make_vit("vit_base_patch16_224", dtype=dtype, **options))


GAP_VARIANTS = {
    "gap": dict(class_token=False, global_pool="avg", fc_norm=False),  # vit_*_gap_*: norm, then mean
    "registers_gap": dict(class_token=False, reg_tokens=4, global_pool="avg"),  # fc_norm after the mean
    "cls_avg": dict(global_pool="avg"),  # a class token, yet an average-pooled head
}


def small_gap(variant="gap", dtype=torch.float64, depth=4):
    """Average-pooled timm ViTs (``global_pool='avg'``), with or without a class token."""
    return small_vit(dtype, depth=depth, **GAP_VARIANTS[variant])


MAP_VARIANTS = {
    "siglip": ("vit_base_patch16_siglip_224", {}),  # no class token: received-attention score
    "cls_map": ("vit_base_patch16_224", dict(global_pool="map")),  # a class token, sliced off before the pool
}


def small_map(variant="siglip", dtype=torch.float64, depth=4):
    """Attention-pooled timm ViTs (``global_pool='map'``), the probe at a scale where its softmax is
    far from uniform."""
    name, options = MAP_VARIANTS[variant]
    options = dict(img_size=64, depth=depth, embed_dim=64, num_heads=4, num_classes=10) | options
    model = randomise(make_vit(name, dtype=dtype, **options))
    with torch.no_grad():
        model.attn_pool.latent.normal_(0, 1.0)
        model.attn_pool.kv.weight.normal_(0, 0.3)
    return model


def small_beit(dtype=torch.float64, **kwargs):
    """timm ``Beit``: a relative position bias table per block."""
    options = dict(img_size=64, depth=4, embed_dim=64, num_heads=4, num_classes=10) | kwargs
    return randomise(make_vit("beit_base_patch16_224", dtype=dtype, **options))


# name, constructor options: class token + avg pool (EVA-02), token pool (RoPE-ViT), per-block
# "mixed" RoPE tables, class + 4 registers with dynamic image size and rotate-half (DINOv3), and
# registers only with avg pool (no class token: received-attention score).
EVA_VARIANTS = {
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56)),
    "rope_axial": ("vit_small_patch16_rope_224", dict(img_size=64, embed_dim=64, num_heads=4)),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=64, embed_dim=64, num_heads=4)),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=64, embed_dim=64, num_heads=4)),
    "rope_gap": ("vit_base_patch16_rope_reg1_gap_256", dict(img_size=64, embed_dim=64, num_heads=4)),
}


def small_eva(variant="eva02", dtype=torch.float64, depth=4):
    """timm ``Eva``: rotary position tables."""
    name, options = EVA_VARIANTS[variant]
    return randomise(make_vit(name, dtype=dtype, depth=depth, num_classes=10, **options))


def eva_images(variant="eva02", dtype=torch.float64, batch=3):
    return images(batch, size=EVA_VARIANTS[variant][1]["img_size"], dtype=dtype)


# an MLP bias without a class token (the default vit_relpos_*), a table bias ("bias") with a
# class token and average pooling, and a class-token head.
RELPOS_VARIANTS = {
    "mlp_gap": ("vit_relpos_medium_patch16_224", {}),
    "table_cls_gap": ("vit_relpos_base_patch16_clsgap_224", dict(rel_pos_type="bias")),
    "mlp_cls_token": ("vit_relpos_base_patch16_cls_224", {}),
}


def small_relpos(variant="mlp_gap", dtype=torch.float64, depth=4):
    """timm ``VisionTransformerRelPos``: a relative position bias (a table, or an MLP over offsets)."""
    name, options = RELPOS_VARIANTS[variant]
    return randomise_relpos(
        make_vit(name, dtype=dtype, img_size=64, depth=depth, embed_dim=64, num_heads=4, num_classes=10, **options)
    )


def randomise_relpos(model):
    randomise(model)
    with torch.no_grad():  # the MLP bias starts near zero: give it weight so positions matter
        for name, p in model.named_parameters():
            if "rel_pos.mlp" in name and name.endswith("weight"):
                p.normal_(0, 1.0)
            if name.startswith("blocks.") and ".norm" in name and name.endswith("weight"):
                p.fill_(1.0)  # post-norm blocks start their norms at 1e-5 (res-post init)
    return model


# --- torchvision ---


def small_torchvision(dtype=torch.float64, depth=4):
    """A small torchvision ViT with a randomised head: torchvision zero-initialises it, which
    would make every output comparison pass vacuously."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=8, num_layers=depth, num_heads=4, hidden_dim=64, mlp_dim=128)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_(0, 0.2)
        model.class_token.normal_(0, 0.2)
    return model.to(dtype).eval()


# --- transformers ---


def small_hf(
    cls_name: str = "ViTForImageClassification", implementation: str = "sdpa", dtype=torch.float64, depth: int = 4
):
    """A small random-init transformers ViT/DeiT; heads and prefix tokens re-drawn at a scale where
    outputs are far from zero (transformers initialises them at std 0.02)."""
    import transformers

    torch.manual_seed(0)
    config_cls = transformers.DeiTConfig if cls_name.startswith("DeiT") else transformers.ViTConfig
    config = config_cls(
        image_size=64,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=depth,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
        attn_implementation=implementation,
    )
    model = getattr(transformers, cls_name)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "classifier" in name or "token" in name:
                p.normal_(0, 0.2)
    return model.to(dtype).eval()


CLIP_SIZE = 48  # 6 x 6 patches of 8


def clip_config(implementation="sdpa", depth=4):
    import transformers

    return transformers.CLIPVisionConfig(
        image_size=CLIP_SIZE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=depth,
        num_attention_heads=2,
        projection_dim=16,
        attn_implementation=implementation,
    )


def small_hf_clip(cls_name="CLIPVisionModelWithProjection", implementation="sdpa", dtype=torch.float64, depth=4):
    """A small random-init CLIP vision tower; q/k projections re-drawn larger, so attention is far
    from uniform and a wrong ranking moves the output."""
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(clip_config(implementation, depth))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if any(k in key for k in ("q_proj.weight", "k_proj.weight", "class_embedding", "position_embedding")):
                p.normal_(0, 0.3)
    return model.to(dtype).eval()


def clip_images(batch=3, dtype=torch.float64):
    return images(batch, CLIP_SIZE, dtype=dtype)


DINOV2_MODELS = {  # name: (class, register tokens)
    "plain": ("Dinov2Model", 0),
    "registers": ("Dinov2WithRegistersModel", 2),
    "classifier": ("Dinov2ForImageClassification", 0),
    "registers_classifier": ("Dinov2WithRegistersForImageClassification", 2),
    "backbone": ("Dinov2Backbone", 0),
}
DINOV2_SIZE = 48  # 6 x 6 patches of 8


def small_hf_dinov2(name="registers", implementation="sdpa", dtype=torch.float64, depth=4, **config):
    """A small random-init DINOv2 whose layer scales, tokens, position embeddings, q/k projections
    and head are re-drawn at magnitudes where a wrong token, scale or weight moves the output
    (transformers initialises them at 1, 0 or std 0.02)."""
    import transformers

    cls_name, registers = DINOV2_MODELS[name]
    torch.manual_seed(0)
    config_cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    options = dict(num_register_tokens=registers) if registers else {}
    config = config_cls(
        image_size=DINOV2_SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=depth,
        num_attention_heads=2,
        mlp_ratio=2,
        num_labels=5,
        attn_implementation=implementation,
        **options | config,
    )
    model = getattr(transformers, cls_name)(config)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lambda1" in key:
                p.normal_(1, 0.5)
            elif any(k in key for k in ("token", "position_embeddings", "classifier", "q_proj.weight", "k_proj")):
                p.normal_(0, 0.3)
    return model.to(dtype).eval()


def dinov2_images(batch=3, dtype=torch.float64, size=DINOV2_SIZE):
    return images(batch, size, dtype=dtype)


def small_hf_siglip(implementation: str = "sdpa", dtype=torch.float64, depth: int = 4, **options):
    """A small random-init SigLIP vision tower; the head's probe and attention re-drawn at a scale
    where its softmax is far from uniform (transformers initialises them small)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(
        image_size=64,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=depth,
        num_attention_heads=4,
        intermediate_size=128,
        attn_implementation=implementation,
        **options,
    )
    model = transformers.SiglipVisionModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("head.") and ("probe" in name or "in_proj_weight" in name):
                p.normal_(0, 0.5)
    return model.to(dtype).eval()


# --- open_clip ---

OPEN_CLIP_TOWER = dict(image_size=32, patch_size=8, width=32, layers=4, heads=2, mlp_ratio=4, output_dim=16)
OPEN_CLIP_POOLER = dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)


def small_open_clip(pool: str = "tok", dtype=torch.float64, **kwargs):
    """A tiny open_clip tower (16 image tokens) with attention far from uniform and layer scales at
    0.5 (their 1e-5-style inits would hide a wrong residual)."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(**(OPEN_CLIP_TOWER | dict(pool_type=pool, ls_init_value=0.5) | kwargs))
    with torch.no_grad():
        for block in model.transformer.resblocks:
            block.attn.in_proj_weight.normal_(0, 0.3)
    return model.to(dtype).eval()


def small_open_clip_pooled(pool: str = "tok", dtype=torch.float64, **kwargs):
    """The tower with CoCa's attentional pooler (4 queries, output_dim 16 != width 32: separate key
    and value projections), its query scaled up so its softmax is far from uniform."""
    model = small_open_clip(pool, dtype, **(OPEN_CLIP_POOLER | kwargs))
    with torch.no_grad():
        model.attn_pool.query.mul_(4)
    return model


def open_clip_images(batch: int = 3, dtype=torch.float64):
    return images(batch, size=32, dtype=dtype)
