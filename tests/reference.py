"""An explicit EViT reference for timm ViTs, written from the paper and the official code's
semantics, independent of evit_patch: full attention map, per-sample Python top-k bookkeeping."""

from __future__ import annotations

import math

import torch


def reference_attention(attn, x):
    """timm Attention with the full (B, H, N, N) map materialised."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
    return attn.proj(attn.norm(out)), probs


def reference_reorganize(x, probs, prefix: int, keep: float, fuse: bool):
    """Keep ceil(keep * (N - P)) image tokens by head-averaged [CLS] attention; fuse the rest."""
    batch, tokens, _ = x.shape
    n_image = tokens - prefix
    n_keep = math.ceil(keep * n_image)
    if keep >= 1 or n_keep >= n_image:
        return x
    scores = probs[:, :, 0, prefix:].mean(dim=1)  # (B, N - P)
    out = []
    for b in range(batch):
        order = sorted(range(n_image), key=lambda i: -scores[b, i].item())
        kept, dropped = order[:n_keep], order[n_keep:]
        rows = [x[b, :prefix]] + [x[b, prefix + i][None] for i in kept]
        if fuse:
            rows.append(sum(scores[b, i] * x[b, prefix + i] for i in dropped)[None])
        out.append(torch.cat(rows))
    return torch.stack(out)


def reference_forward(model, images, layers, keep, fuse: bool = True):
    """EViT forward of a timm VisionTransformer (pre-norm Block), by hand."""
    keeps = dict(zip(layers, keep if isinstance(keep, (list, tuple)) else [keep] * len(layers)))
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for index, block in enumerate(model.blocks):
        out, probs = reference_attention(block.attn, block.norm1(x))
        x = x + block.ls1(out)
        if index in keeps:
            x = reference_reorganize(x, probs, model.num_prefix_tokens, keeps[index], fuse)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x))


def reference_forward_torchvision(model, images, layers, keep, fuse: bool = True):
    """EViT forward of a torchvision VisionTransformer, attention from ``in_proj`` by hand."""
    keeps = dict(zip(layers, keep if isinstance(keep, (list, tuple)) else [keep] * len(layers)))
    x = model._process_input(images)
    x = torch.cat([model.class_token.expand(len(x), -1, -1), x], dim=1) + model.encoder.pos_embedding
    for index, block in enumerate(model.encoder.layers):
        mha = block.self_attention
        batch, tokens, channels = x.shape
        heads = mha.num_heads
        qkv = torch.nn.functional.linear(block.ln_1(x), mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.reshape(batch, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        probs = ((q @ k.transpose(-2, -1)) / math.sqrt(channels // heads)).softmax(dim=-1)
        x = x + mha.out_proj((probs @ v).transpose(1, 2).reshape(batch, tokens, channels))
        if index in keeps:
            x = reference_reorganize(x, probs, 1, keeps[index], fuse)
        x = x + block.mlp(block.ln_2(x))
    return model.heads(model.encoder.ln(x)[:, 0])


def reference_forward_hf(model, images, layers, keep, fuse: bool = True):
    """EViT forward of a transformers ViT*/DeiT* image model, each layer by hand from its Linears.

    "eager" attention computes its softmax in float32 and casts back (transformers' own
    semantics), so the reference does too, and ranks tokens by those float32 probabilities;
    "sdpa" keeps the model dtype. Returns the head's
    logits (the (cls + distillation) / 2 average for DeiT with teacher) or, for a bare
    ``ViTModel``/``DeiTModel``, ``(last_hidden_state, pooler_output)``.
    """
    keeps = dict(zip(layers, keep if isinstance(keep, (list, tuple)) else [keep] * len(layers)))
    base = model.base_model
    prefix = 2 if hasattr(base.embeddings, "distillation_token") else 1
    eager = model.config._attn_implementation == "eager"
    x = base.embeddings(images)
    for index, layer in enumerate(base.layers):
        attn = layer.attention
        batch, tokens, _ = x.shape
        h = layer.layernorm_before(x)
        q, k, v = (
            p(h).reshape(batch, tokens, -1, attn.head_dim).transpose(1, 2)
            for p in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        logits = (q @ k.transpose(-2, -1)) * attn.head_dim**-0.5
        probs = logits.softmax(dim=-1, dtype=torch.float32) if eager else logits.softmax(dim=-1)
        x = x + attn.o_proj((probs.to(x.dtype) @ v).transpose(1, 2).reshape(batch, tokens, -1))
        if index in keeps:
            x = reference_reorganize(x, probs, prefix, keeps[index], fuse)
        x = x + layer.mlp(layer.layernorm_after(x))
    x = base.layernorm(x)
    if base is model:
        return x, (base.pooler(x) if base.pooler is not None else None)
    if hasattr(model, "distillation_classifier"):
        return (model.cls_classifier(x[:, 0]) + model.distillation_classifier(x[:, 1])) / 2
    return model.classifier(x[:, 0])


def assert_patches_like_timm(model, timm_model, images, logits=lambda m, x: m(x)):
    """``model`` holds ``timm_model``'s weights in another library's classes: in float64 the two
    agree, and patched at keep 0.7 @ 3, 6, 9 they agree again (and differ from unpatched)."""
    import copy

    import evit_patch

    model, timm_model, x = model.double().eval(), copy.deepcopy(timm_model).double(), images.double()
    with torch.no_grad():
        original = logits(model, x)
        torch.testing.assert_close(original, timm_model(x), rtol=0, atol=1e-9)
        got = logits(evit_patch.apply(model, layers=[3, 6, 9], keep=0.7), x)
        want = evit_patch.apply(timm_model, layers=[3, 6, 9], keep=0.7)(x)
    assert not torch.allclose(got, original, atol=1e-3)  # the patch changes the output ...
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)  # ... identically in both libraries
