"""Vision transformers from outside the four libraries, written for the discovery tests.

``HandViT`` is the 60-line ViT a user writes (conv patch embedding, class token, pre-norm blocks),
with its attention in one of the forms real code uses. ``DinoStyleViT`` and ``MaeStyleViT`` are
our own equivalents of the official DINO ``vision_transformer.py`` and MAE ``models_vit.py``:
the same structure and semantics (DINO: manual attention returning its map, ``return_attention``,
``prepare_tokens`` with position interpolation, the normed class token as output; MAE: a timm
subclass whose ``global_pool=True/False`` picks the mean of the image tokens with ``fc_norm`` or
the normed class token), written anew. Every model's parameters carry timm's names, or map onto
them (:func:`to_timm`), so a timm ``VisionTransformer`` patched by its own family is the reference.
"""

from __future__ import annotations

import math

import einops
import timm
import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from timm.models.vision_transformer import VisionTransformer
from torch import nn

ATTENTION_FORMS = (
    "matmul",
    "softmax_module",
    "einsum",
    "einops_function",
    "einops_layer",
    "separate_qkv",
    "mha",
    "mha_sequence_first",
)
"""The attention forms ``HandViT`` is written in (``post_norm`` is a block form: :class:`PostNormBlock`)."""


class Attention(nn.Module):
    """Multi-head self-attention with a packed ``qkv`` projection, written in ``form``."""

    def __init__(self, dim: int, heads: int, form: str) -> None:
        super().__init__()
        self.heads, self.form, self.scale = heads, form, (dim // heads) ** -0.5
        if form == "separate_qkv":
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        if form == "softmax_module":
            self.attend = nn.Softmax(dim=-1)
        if form == "einops_layer":
            self.split = Rearrange("b n (three h d) -> three b h n d", three=3, h=heads)
            self.merge = Rearrange("b h n d -> b n (h d)")
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        if self.form == "separate_qkv":
            q, k, v = (p(x).view(batch, tokens, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
            out = F.scaled_dot_product_attention(q, k, v)
            return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        if self.form == "einops_function":
            q, k, v = einops.rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        elif self.form == "einops_layer":
            q, k, v = self.split(self.qkv(x))
        else:
            q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.form == "einsum":
            probs = torch.einsum("bhid,bhjd->bhij", q, k).mul(self.scale).softmax(dim=-1)
            out = torch.einsum("bhij,bhjd->bhid", probs, v)
        else:
            logits = (q @ k.transpose(-2, -1)) * self.scale
            probs = self.attend(logits) if self.form == "softmax_module" else logits.softmax(dim=-1)
            out = probs @ v
        if self.form == "einops_layer":
            return self.proj(self.merge(out))
        if self.form == "einops_function":
            return self.proj(einops.rearrange(out, "b h n d -> b n (h d)"))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """A pre-norm block; ``nn.MultiheadAttention`` (batch-first or not) in the MHA forms."""

    def __init__(self, dim: int, heads: int, form: str) -> None:
        super().__init__()
        self.form = form
        self.norm1 = nn.LayerNorm(dim)
        if form.startswith("mha"):
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=form == "mha")
        else:
            self.attn = Attention(dim, heads, form)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        if self.form == "mha":
            return self.attn(h, h, h, need_weights=False)[0]
        if self.form == "mha_sequence_first":
            h = h.transpose(0, 1)
            return self.attn(h, h, h, need_weights=False)[0].transpose(0, 1)
        return self.attn(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PostNormBlock(Block):
    """The original Transformer's order: the norm after each residual add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attend(x))
        return self.norm2(x + self.mlp(x))


class HandViT(nn.Module):
    """Conv patch embedding, class token, learned positions, blocks, final norm, class-token head."""

    def __init__(self, form: str = "matmul", img: int = 32, patch: int = 8, dim: int = 32, depth: int = 3, heads=2):
        super().__init__()
        post = form == "post_norm"
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        block = PostNormBlock if post else Block
        self.blocks = nn.ModuleList([block(dim, heads, "matmul" if post else form) for _ in range(depth)])
        self.norm = nn.Identity() if post else nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def to_timm(model: HandViT) -> VisionTransformer:
    """The timm ViT computing what a pre-norm ``HandViT`` computes, with its weights (qkv packed)."""
    dim = model.cls_token.shape[-1]
    patch = model.patch_embed.kernel_size[0]
    img = patch * math.isqrt(model.pos_embed.shape[1] - 1)
    heads = model.blocks[0].attn.num_heads if isinstance(model.blocks[0].attn, nn.MultiheadAttention) else None
    heads = heads or model.blocks[0].attn.heads
    reference = VisionTransformer(
        img_size=img,
        patch_size=patch,
        embed_dim=dim,
        depth=len(model.blocks),
        num_heads=heads,
        mlp_ratio=2,
        qkv_bias=True,
        num_classes=10,
        norm_layer=nn.LayerNorm,
    )
    state = {}
    for key, value in model.state_dict().items():
        key = (
            key.replace("patch_embed.", "patch_embed.proj.").replace("mlp.0.", "mlp.fc1.").replace("mlp.2.", "mlp.fc2.")
        )
        key = key.replace("attn.in_proj_", "attn.qkv.").replace("attn.out_proj.", "attn.proj.")
        for name in ("weight", "bias"):
            for part in "qkv":
                if key.endswith(f"attn.{part}.{name}"):
                    key = key.replace(f"attn.{part}.{name}", f"attn.qkv.{name}.{part}")
        state[key] = value
    for key in [k for k in state if k.endswith((".q", ".k", ".v"))]:
        if key.endswith(".q"):
            stem = key[:-2]
            state[stem] = torch.cat([state.pop(f"{stem}.{p}") for p in "qkv"])
    reference.load_state_dict(state)
    return reference.to(model.cls_token.dtype).eval()


class DinoAttention(nn.Module):
    """DINO's attention: manual softmax, returns the output and the attention map."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, dim))), attn


class DinoDropPath(nn.Module):
    """Stochastic depth that reads ``self.training``, as DINO's does."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, dtype=x.dtype, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class DinoBlock(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DinoAttention(dim, heads)
        self.drop_path = DinoDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = timm.layers.Mlp(dim, 4 * dim)

    def forward(self, x, return_attention=False):
        out, attn = self.attn(self.norm1(x))
        if return_attention:
            return attn
        x = x + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DinoPatchEmbed(nn.Module):
    def __init__(self, img: int, patch: int, dim: int) -> None:
        super().__init__()
        self.patch_size, self.num_patches = patch, (img // patch) ** 2
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoStyleViT(nn.Module):
    """DINO's ViT: no classifier applied in ``forward``, which returns the normed class token."""

    def __init__(self, img: int = 32, patch: int = 8, dim: int = 32, depth: int = 3, heads: int = 2, drop_path=0.1):
        super().__init__()
        self.patch_embed = DinoPatchEmbed(img, patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, dim) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList([DinoBlock(dim, heads, rate) for rate in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Identity()

    def interpolate_pos_encoding(self, x, width, height):
        patches, stored = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if patches == stored and width == height:
            return self.pos_embed
        side = int(math.sqrt(stored))
        grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        size = (width // self.patch_embed.patch_size, height // self.patch_embed.patch_size)
        grid = F.interpolate(grid, size=size, mode="bicubic").permute(0, 2, 3, 1).flatten(1, 2)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def prepare_tokens(self, images):
        _, _, width, height = images.shape
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        return self.pos_drop(x + self.interpolate_pos_encoding(x, width, height))

    def forward(self, images):
        x = self.prepare_tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def get_last_selfattention(self, images):
        x = self.prepare_tokens(images)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1](x, return_attention=True)


class MaeStyleViT(VisionTransformer):
    """MAE's fine-tuning ViT: a timm subclass whose ``global_pool`` is a bool. ``True``: the mean of
    the image tokens, then ``fc_norm`` (the final ``norm`` is deleted); ``False``: the normed class
    token. ``forward`` is timm 0.3.2's (features, then head), which MAE was written against."""

    def __init__(self, global_pool: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.global_pool = global_pool
        if global_pool:
            self.fc_norm = kwargs["norm_layer"](kwargs["embed_dim"])
            del self.norm

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, x):
        return self.head(self.forward_features(x))


def mae(global_pool: bool, **kwargs) -> MaeStyleViT:
    from functools import partial

    options = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10, qkv_bias=True)
    return MaeStyleViT(global_pool, norm_layer=partial(nn.LayerNorm, eps=1e-6), **(options | kwargs))


def mae_as_timm(model: MaeStyleViT) -> VisionTransformer:
    """timm's ViT computing what ``model`` computes: ``'avg'`` with ``fc_norm``, or ``'token'``."""
    from functools import partial

    pool = "avg" if model.global_pool else "token"
    reference = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
        num_classes=10,
        qkv_bias=True,
        global_pool=pool,
        fc_norm=bool(model.global_pool),
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    reference.load_state_dict(model.state_dict())
    return reference.to(model.cls_token.dtype).eval()


def dino_as_timm(model: DinoStyleViT) -> VisionTransformer:
    """timm's ViT (no classifier) computing what ``model`` computes, with its weights."""
    from functools import partial

    reference = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=len(model.blocks),
        num_heads=2,
        num_classes=0,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    reference.load_state_dict(model.state_dict())
    return reference.to(model.cls_token.dtype).eval()
