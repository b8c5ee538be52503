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


def _mha_by_hand(mha, x, size, proportional):
    """``nn.MultiheadAttention`` of one sample ``(1, N, C)`` from ``in_proj`` by hand, with ``log(size)``
    added to the logits when ``proportional``: ``(output, probabilities, keys)``."""
    tokens, channels = x.shape[1], x.shape[2]
    qkv = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.reshape(1, tokens, 3, mha.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(channels // mha.num_heads)
    if proportional:
        logits = logits + torch.tensor([math.log(s) for s in size], dtype=x.dtype)
    probs = logits.softmax(dim=-1)
    return mha.out_proj((probs @ v).transpose(1, 2).reshape(1, tokens, channels)), probs, k


def reference_forward_torchvision(model, images, layers, keep, fuse: bool = True, method="evit", proportional=None):
    """EViT (or ``method="merge"``) forward of a torchvision VisionTransformer, sample by sample,
    attention from ``in_proj`` by hand."""
    merging = method == "merge"
    proportional = merging if proportional is None else proportional
    keeps = dict(zip(layers, keep if isinstance(keep, (list, tuple)) else [keep] * len(layers)))
    outputs = []
    for image in images:
        x = model._process_input(image[None])
        x = torch.cat([model.class_token, x], dim=1) + model.encoder.pos_embedding
        pos, size = list(range(x.shape[1])), [1] * x.shape[1]
        for index, block in enumerate(model.encoder.layers):
            attended, probs, k = _mha_by_hand(block.self_attention, block.ln_1(x), size, proportional)
            x = x + attended
            if index in keeps:
                keys = k if merging else None
                x, pos, size = _reorganize_sample(x, probs, pos, size, 1, keeps[index], fuse, True, False, keys)
            x = x + block.mlp(block.ln_2(x))
        outputs.append(model.heads(model.encoder.ln(x)[:, 0]))
    return torch.cat(outputs)


def reference_forward_hf(model, images, layers, keep, fuse: bool = True, method="evit", proportional=None):
    """EViT (or ``method="merge"``) forward of a transformers ViT*/DeiT* image model, sample by
    sample, each layer by hand from its Linears.

    "eager" attention computes its softmax in float32 and casts back (transformers' own
    semantics), so the reference does too, and ranks tokens by those float32 probabilities;
    "sdpa" keeps the model dtype. Returns the head's
    logits (the (cls + distillation) / 2 average for DeiT with teacher) or, for a bare
    ``ViTModel``/``DeiTModel``, ``(last_hidden_state, pooler_output)``.
    """
    merging = method == "merge"
    proportional = merging if proportional is None else proportional
    keeps = dict(zip(layers, keep if isinstance(keep, (list, tuple)) else [keep] * len(layers)))
    base = model.base_model
    prefix = 2 if hasattr(base.embeddings, "distillation_token") else 1
    eager = model.config._attn_implementation == "eager"
    hidden = []
    for image in images:
        x = base.embeddings(image[None])
        pos, size = list(range(x.shape[1])), [1] * x.shape[1]
        for index, layer in enumerate(base.layers):
            attn = layer.attention
            h = layer.layernorm_before(x)
            q, k, v = (
                p(h).reshape(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
                for p in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            logits = (q @ k.transpose(-2, -1)) * attn.head_dim**-0.5
            if proportional:
                logits = logits + torch.tensor([math.log(s) for s in size], dtype=x.dtype)
            probs = logits.softmax(dim=-1, dtype=torch.float32) if eager else logits.softmax(dim=-1)
            x = x + attn.o_proj((probs.to(x.dtype) @ v).transpose(1, 2).reshape(1, h.shape[1], -1))
            if index in keeps:
                keys = k if merging else None
                x, pos, size = _reorganize_sample(x, probs, pos, size, prefix, keeps[index], fuse, True, False, keys)
            x = x + layer.mlp(layer.layernorm_after(x))
        hidden.append(base.layernorm(x))
    x = torch.cat(hidden)
    if base is model:
        return x, (base.pooler(x) if base.pooler is not None else None)
    if hasattr(model, "distillation_classifier"):
        return (model.cls_classifier(x[:, 0]) + model.distillation_classifier(x[:, 1])) / 2
    return model.classifier(x[:, 0])


def assert_patches_like_timm(model, timm_model, images, logits=lambda m, x: m(x), atol=1e-9, **options):
    """``model`` holds ``timm_model``'s weights in another library's classes: in float64 the two
    agree, and patched at keep 0.7 @ 3, 6, 9 (``options``: e.g. ``method="merge"``) they agree
    again (and differ from unpatched)."""
    import copy

    import evit_patch

    model, timm_model, x = model.double().eval(), copy.deepcopy(timm_model).double(), images.double()
    with torch.no_grad():
        original = logits(model, x)
        torch.testing.assert_close(original, timm_model(x), rtol=0, atol=atol)
        got = logits(evit_patch.apply(model, layers=[3, 6, 9], keep=0.7, **options), x)
        want = evit_patch.apply(timm_model, layers=[3, 6, 9], keep=0.7, **options)(x)
    assert not torch.allclose(got, original, atol=1e-3)  # the patch changes the output ...
    torch.testing.assert_close(got, want, rtol=0, atol=atol)  # ... identically in both libraries


# --- Position-aware families: one sample at a time, positions and sizes as Python lists. ---
# ``pos[i]`` is token i's index in the original sequence (prefix included), ``None`` once fused;
# ``size[i]`` how many original image tokens it stands for.


def _rotate(x, sin, cos, half: bool):
    """RoPE on ``x`` (H, D) with one position's sin/cos (D,): interleaved pairs or halves."""
    if half:
        x1, x2 = x.chunk(2, dim=-1)
        turned = torch.cat([-x2, x1], dim=-1)
    else:
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    return x * cos + turned * sin


def _qkv(attn, h):
    """q, k, v as (1, H, N, D) from a BEiT/EVA attention's projections (k bias is zero)."""
    if getattr(attn, "qkv", None) is not None:
        q_bias = getattr(attn, "q_bias", None)
        bias = None if q_bias is None else torch.cat([q_bias, torch.zeros_like(q_bias), attn.v_bias])
        out = torch.nn.functional.linear(h, attn.qkv.weight, bias)
        if attn.qkv.bias is not None:
            out = out + attn.qkv.bias
        q, k, v = out.reshape(1, h.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    else:
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        q, k, v = (p(h).reshape(1, h.shape[1], attn.num_heads, -1).transpose(1, 2) for p in projections)
    return q, k, v


def _beit_bias(attn, pos):
    """(1, H, N', N') relative position bias by hand: table[index[p_i, p_j]], 0 where a token is fused."""
    heads = attn.relative_position_bias_table.shape[1]
    bias = torch.zeros(1, heads, len(pos), len(pos), dtype=attn.relative_position_bias_table.dtype)
    for i, p in enumerate(pos):
        for j, r in enumerate(pos):
            if p is not None and r is not None:
                bias[0, :, i, j] = attn.relative_position_bias_table[attn.relative_position_index[p, r]]
    return bias


def _lookup_bias(full, pos):
    """(1, H, N', N') entries of a full (1, H, N, N) or (H, N, N) bias at the tokens' original
    positions; 0 where fused."""
    full = full.reshape(1, *full.shape[-3:])
    bias = torch.zeros(1, full.shape[1], len(pos), len(pos), dtype=full.dtype)
    for i, p in enumerate(pos):
        for j, r in enumerate(pos):
            if p is not None and r is not None:
                bias[0, :, i, j] = full[0, :, p, r]
    return bias


def _attention(kind, block, h, pos, prefix, rope, shared=None, size=None, need_keys=False):
    """One block's attention output, its full (1, H, N, N) probabilities and its keys, by hand;
    ``shared``: a (1, H, N, N) bias the model passes to every block; ``size``: the tokens' sizes
    for proportional attention (log(size) added to each key's logits)."""
    attn = block.attn
    if kind == "vit" and size is None and not need_keys:
        out, probs = reference_attention(attn, h)
        return out, probs, None
    q, k, v = _qkv(attn, h)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    logits_bias = 0
    if kind == "beit" and attn.relative_position_bias_table is not None:
        logits_bias = _beit_bias(attn, pos)
    if kind == "relpos" and attn.rel_pos is not None:
        logits_bias = _lookup_bias(attn.rel_pos.get_bias(), pos)
    if shared is not None:
        logits_bias = logits_bias + _lookup_bias(shared, pos)
    if size is not None:
        logits_bias = logits_bias + torch.tensor([math.log(s) for s in size], dtype=h.dtype)
    if kind == "eva" and rope is not None:
        half = rope.shape[-1] // 2
        q, k = q.clone(), k.clone()
        for i, p in enumerate(pos):
            if i >= prefix and p is not None:
                row = rope[..., p - prefix, :]  # (2D,) or (H, 2D) for mixed RoPE
                sin, cos = row[..., :half], row[..., half:]
                half_rot = getattr(attn, "rotate_half", False)
                q[0, :, i] = _rotate(q[0, :, i], sin, cos, half_rot)
                k[0, :, i] = _rotate(k[0, :, i], sin, cos, half_rot)
    probs = ((q @ k.transpose(-2, -1)) * attn.scale + logits_bias).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(1, h.shape[1], -1)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    return attn.proj(out), probs, k


def _layer_scales(kind, block):
    if kind in ("vit", "relpos"):
        return block.ls1, block.ls2
    gamma1, gamma2 = block.gamma_1, block.gamma_2
    return (lambda y: y if gamma1 is None else gamma1 * y), (lambda y: y if gamma2 is None else gamma2 * y)


def _embed(kind, model, image):
    """Tokens entering the first block (1, N, C), and the rotary table (EVA) or ``None``."""
    x = model.patch_embed(image)
    if kind == "vit":
        return model.norm_pre(model._pos_embed(x)), None
    if kind == "eva":
        x, rope = model._pos_embed(x)
        return model.norm_pre(x), rope
    if kind == "relpos":
        return (x if model.cls_token is None else torch.cat([model.cls_token.expand(1, -1, -1), x], dim=1)), None
    x = torch.cat([model.cls_token.expand(1, -1, -1), x], dim=1)
    return (x if model.pos_embed is None else x + model.pos_embed), None


def _merge_sample(x, keys, pos, size, prefix, kept, dropped):
    """Token merging on one sample: each dropped token joins the kept token whose head-averaged
    key has the highest cosine similarity; merged tokens are size-weighted means."""
    key = keys[0].mean(dim=0)  # (N, D)

    def cosine(i, j):
        a, b = key[prefix + i], key[prefix + j]
        return (a @ b / (a.norm() * b.norm())).item()

    groups = {j: [j] for j in kept}
    for d in dropped:
        groups[max(kept, key=lambda j: cosine(d, j))].append(d)  # first of equals, as argmax
    rows = [x[0, :prefix]]
    for j in kept:
        weights = [size[prefix + m] for m in groups[j]]
        rows.append((sum(w * x[0, prefix + m] for w, m in zip(weights, groups[j])) / sum(weights))[None])
    new_pos = pos[:prefix] + [pos[prefix + j] for j in kept]
    new_size = size[:prefix] + [sum(size[prefix + m] for m in groups[j]) for j in kept]
    return torch.cat(rows)[None], new_pos, new_size


def _dam_sample(x, scores, pos, size, prefix, n_keep):
    """Distinctive-attended merging on one sample, by the definition: cost_j = (M a_j)(1 - max cosine
    to a token on the other side of the even/odd split); the top-cost tokens stay, every other joins
    the kept token of highest cosine (first of equals), size-weighted."""
    n_image = x.shape[1] - prefix
    tokens = [x[0, prefix + i] for i in range(n_image)]

    def cosine(i, j):
        return (tokens[i] @ tokens[j] / (tokens[i].norm() * tokens[j].norm())).item()

    def nearest(i):
        return max(cosine(i, j) for j in range(n_image) if j % 2 != i % 2)

    cost = [max(n_image * scores[i].item(), 1e-9) * max(1 - nearest(i), 1e-6) for i in range(n_image)]
    order = sorted(range(n_image), key=lambda i: -cost[i])
    kept, moved = order[:n_keep], order[n_keep:]
    groups = {j: [j] for j in kept}
    for m in moved:
        groups[max(kept, key=lambda j: cosine(m, j))].append(m)
    rows = [x[0, :prefix]]
    for j in kept:
        weights = [size[prefix + m] for m in groups[j]]
        rows.append((sum(w * tokens[m] for w, m in zip(weights, groups[j])) / sum(weights))[None])
    new_pos = pos[:prefix] + [pos[prefix + j] for j in kept]
    new_size = size[:prefix] + [sum(size[prefix + m] for m in groups[j]) for j in kept]
    return torch.cat(rows)[None], new_pos, new_size


def _reorganize_sample(x, probs, pos, size, prefix, keep, fuse, cls, mean, keys=None, dam=False):
    """EViT on one sample, moving ``pos`` and ``size`` along with the tokens; ``mean``: the fused
    token is the score-weighted mean of the dropped tokens (average-pooled heads); ``keys``: merge
    the dropped tokens into kept ones instead (method="merge")."""
    n_image = x.shape[1] - prefix
    n_keep = math.ceil(keep * n_image)
    if keep >= 1 or n_keep >= n_image:
        return x, pos, size
    scores = probs[0, :, 0, prefix:].mean(dim=0) if cls else probs[0, :, :, prefix:].mean(dim=(0, 1))
    order = sorted(range(n_image), key=lambda i: -scores[i].item())
    if dam:
        return _dam_sample(x, scores, pos, size, prefix, n_keep)
    kept, dropped = order[:n_keep], order[n_keep:]
    if keys is not None:
        return _merge_sample(x, keys, pos, size, prefix, kept, dropped)
    rows = [x[0, :prefix]] + [x[0, prefix + i][None] for i in kept]
    new_pos = pos[:prefix] + [pos[prefix + i] for i in kept]
    new_size = size[:prefix] + [size[prefix + i] for i in kept]
    if fuse:
        weights = scores.to(x.dtype)  # float32 scores (eager attention) weigh in the tokens' dtype
        fused = sum(weights[i] * x[0, prefix + i] for i in dropped)
        rows.append((fused / sum(weights[i] for i in dropped) if mean else fused)[None])
        new_pos.append(None)
        new_size.append(sum(size[prefix + i] for i in dropped))
    return torch.cat(rows)[None], new_pos, new_size


def reference_forward_tracked(
    kind, model, images, layers, keep, fuse: bool = True, score=None, method="evit", proportional=None, cls_only=False
):
    """EViT forward of a timm ViT ("vit"), ``Beit``, ``Eva`` or ``VisionTransformerRelPos``
    ("relpos") with pre-norm blocks, or an open_clip ``VisionTransformer`` ("open_clip"), sample by sample:
    position bias and rotary rows looked up by each token's original position, [CLS] or
    received-attention scores, a size-weighted average or attention pool; ``method="merge"``: token merging
    with proportional attention (unless ``proportional=False``); ``"dam"``: distinctive-attended merging;
    ``cls_only``: the last block's MLP on the prefix tokens alone."""
    if kind == "open_clip":
        return reference_forward_open_clip(model, images, layers, keep, fuse, method, proportional)
    merging = method in ("merge", "dam")
    proportional = merging if proportional is None else proportional
    keeps = dict(zip(layers, keep if isinstance(keep, (list, tuple)) else [keep] * len(layers)))
    prefix = model.num_prefix_tokens
    cls = getattr(model, "cls_token", None) is not None if score is None else score == "cls"
    shared = None
    if kind == "beit" and model.rel_pos_bias is not None:
        shared = model.rel_pos_bias()
    if kind == "relpos" and model.shared_rel_pos is not None:
        shared = model.shared_rel_pos.get_bias()
    outputs = []
    for image in images:
        x, rope = _embed(kind, model, image[None])
        pos = list(range(x.shape[1]))
        size = [1] * x.shape[1]
        for index, block in enumerate(model.blocks):
            ls1, ls2 = _layer_scales(kind, block)
            table = rope[index] if rope is not None and getattr(model, "rope_mixed", False) else rope
            sizes = size if proportional else None
            h = block.norm1(x)
            out, probs, keys = _attention(kind, block, h, pos, prefix, table, shared, sizes, merging)
            x = x + ls1(out)
            if index in keeps:
                mean = model.global_pool in ("avg", "map")  # pools that weigh the fused token by its size
                keys = keys if method == "merge" else None
                dam = method == "dam"
                x, pos, size = _reorganize_sample(x, probs, pos, size, prefix, keeps[index], fuse, cls, mean, keys, dam)
            if cls_only and index == len(model.blocks) - 1:
                x, pos, size = x[:, :prefix], pos[:prefix], size[:prefix]
            x = x + ls2(block.mlp(block.norm2(x)))
        x = model.norm(x)
        if getattr(model, "attn_pool", None) is not None:  # global_pool="map"; prefix sliced off
            start = 0 if model.pool_include_prefix else prefix
            pooled = reference_timm_attention_pool(model.attn_pool, x[0, start:], size[start:])
        elif model.global_pool == "avg":
            weights = torch.tensor(size[prefix:], dtype=x.dtype)
            pooled = (x[0, prefix:] * weights[:, None]).sum(dim=0) / weights.sum()
        else:
            pooled = x[0, 0]
        outputs.append(model.head(model.fc_norm(pooled[None])))
    return torch.cat(outputs)


def reference_forward_hf_encoder(model, images, layers, keep, fuse: bool = True, method="evit", proportional=None):
    """EViT (or ``method="merge"``) forward of a transformers DINOv2 (with or without registers) or
    CLIP vision model, sample by sample, each layer by hand from its Linears: DINOv2's layer scale,
    CLIP's ``pre_layrnorm`` before the layers and ``post_layernorm`` on the class token alone.
    Register tokens are prefix tokens. CLIP's "eager" softmax runs in float32, as transformers' does.

    Returns a dict of what the model returns: ``last_hidden_state`` and ``pooler_output`` (and
    ``image_embeds`` with a projection), or for ``Dinov2*ForImageClassification`` its ``logits``
    from [CLS] beside the size-weighted mean of the image tokens (registers excluded).
    """
    merging = method == "merge"
    proportional = merging if proportional is None else proportional
    keeps = dict(zip(layers, keep if isinstance(keep, (list, tuple)) else [keep] * len(layers)))
    base = model.base_model
    clip = hasattr(base, "pre_layrnorm")
    averaged = type(model).__name__.endswith("ForImageClassification")
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    float32_softmax = clip and model.config._attn_implementation == "eager"
    hidden, pooled, logits = [], [], []
    for image in images:
        x = base.embeddings(image[None])
        x = base.pre_layrnorm(x) if clip else x
        pos, size = list(range(x.shape[1])), [1] * x.shape[1]
        for index, layer in enumerate(base.encoder.layers if clip else base.encoder.layer):
            attn = layer.self_attn if clip else layer.attention
            h = (layer.layer_norm1 if clip else layer.norm1)(x)
            q, k, v = (
                p(h).reshape(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
                for p in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            scores = (q @ k.transpose(-2, -1)) * attn.head_dim**-0.5
            if proportional:
                scores = scores + torch.tensor([math.log(s) for s in size], dtype=h.dtype)
            probs = scores.softmax(dim=-1, dtype=torch.float32) if float32_softmax else scores.softmax(dim=-1)
            out = (probs.to(h.dtype) @ v).transpose(1, 2).reshape(1, h.shape[1], -1)
            out = attn.out_proj(out) if clip else layer.layer_scale1(attn.o_proj(out))
            x = x + out
            if index in keeps:
                keys = k if merging else None
                x, pos, size = _reorganize_sample(x, probs, pos, size, prefix, keeps[index], fuse, True, averaged, keys)
            mlp = layer.mlp((layer.layer_norm2 if clip else layer.norm2)(x))
            x = x + (mlp if clip else layer.layer_scale2(mlp))
        x = x if clip else base.layernorm(x)
        hidden.append(x)
        pooled.append(base.post_layernorm(x[:, 0]) if clip else x[:, 0])
        if averaged:
            weights = torch.tensor(size[prefix:], dtype=x.dtype)
            mean = (x[0, prefix:] * weights[:, None]).sum(dim=0) / weights.sum()
            logits.append(model.classifier(torch.cat([x[0, 0], mean])[None]))
    if averaged:
        return {"logits": torch.cat(logits)}
    out = {"last_hidden_state": torch.cat(hidden), "pooler_output": torch.cat(pooled)}
    if hasattr(model, "visual_projection"):
        out["image_embeds"] = model.visual_projection(out["pooler_output"])
    return out


def reference_forward_open_clip(model, images, layers, keep, fuse: bool = True, method="evit", proportional=None):
    """EViT (or ``method="merge"``) forward of an open_clip ``VisionTransformer``, sample by sample:
    attention by hand from ``nn.MultiheadAttention``'s ``in_proj``, [CLS] scores, the class token or
    a size-weighted average of the image tokens after ``ln_post`` (or ``ln_post`` on the pooled token
    with ``final_ln_after_pool``), then ``proj``. With an ``attn_pool`` (``attentional_pool=True``): the
    pooler's probe weighs every token, class token included, by its size, then ``ln_post``, the pool
    over its queries and ``proj``; with ``output_tokens``, returns ``(pooled, tokens)`` as open_clip does."""
    merging = method == "merge"
    proportional = merging if proportional is None else proportional
    keeps = dict(zip(layers, keep if isinstance(keep, (list, tuple)) else [keep] * len(layers)))
    pooler = model.attn_pool
    mean = model.pool_type == "avg" or pooler is not None  # pools that weigh the fused token by its size
    outputs, token_outputs = [], []
    for image in images:
        x = model._embeds(image[None])
        pos, size = list(range(x.shape[1])), [1] * x.shape[1]
        for index, block in enumerate(model.transformer.resblocks):
            attended, probs, k = _mha_by_hand(block.attn, block.ln_1(x), size, proportional)
            x = x + block.ls_1(attended)
            if index in keeps:
                keys = k if merging else None
                x, pos, size = _reorganize_sample(x, probs, pos, size, 1, keeps[index], fuse, True, mean, keys)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        if pooler is not None:
            queries = model.ln_post(reference_open_clip_pooler(pooler, x[0], size))
            pooled, tokens = {"tok": (queries[0], queries[1:]), "avg": (queries[1:].mean(0), queries[1:])}.get(
                model.pool_type, (queries, queries)
            )
            outputs.append(pooled[None] @ model.proj)
            token_outputs.append(tokens[None])
            continue
        x = x if model.final_ln_after_pool else model.ln_post(x)
        if mean:
            weights = torch.tensor(size[1:], dtype=x.dtype)
            pooled = (x[0, 1:] * weights[:, None]).sum(dim=0) / weights.sum()
        else:
            pooled = x[0, 0]
        pooled = model.ln_post(pooled) if model.final_ln_after_pool else pooled
        outputs.append(pooled[None] @ model.proj)
    if pooler is not None and model.output_tokens:
        return torch.cat(outputs), torch.cat(token_outputs)
    return torch.cat(outputs)


# --- Attention-pool heads: a probe attends over the tokens, each key's logit raised by log(size). ---


def reference_probe_attention(q, k, v, sizes, scale):
    """One sample's pooling attention with explicit loops: ``q`` (L, H, D) probe queries, ``k`` and
    ``v`` (N, H, D) the tokens' keys and values, ``sizes`` N patch counts. Query ``l`` of head ``h``
    gives key ``j`` the weight ``s_j exp(q·k_j scale) / sum_i s_i exp(q·k_i scale)``: a token standing
    for ``s`` patches weighs as ``s`` copies of itself. Returns (L, H * D)."""
    queries, heads, _ = q.shape
    rows = []
    for query in range(queries):
        out = []
        for h in range(heads):
            logits = [(q[query, h] @ k[j, h]) * scale + math.log(sizes[j]) for j in range(len(sizes))]
            top = max(float(z.detach()) for z in logits)
            weights = [torch.exp(z - top) for z in logits]
            total = sum(weights)
            out.append(sum((w / total) * v[j, h] for j, w in enumerate(weights)))
        rows.append(torch.cat(out))
    return torch.stack(rows)


def reference_timm_attention_pool(pool, x, sizes):
    """timm's ``AttentionPoolLatent`` on one sample's tokens ``x`` (N, C) of ``sizes``, by hand."""
    heads, dim = pool.num_heads, pool.head_dim
    q = pool.q_norm(pool.q(pool.latent[0]).reshape(-1, heads, dim))
    k, v = pool.kv(x).reshape(len(x), 2, heads, dim).unbind(1)
    out = pool.proj(reference_probe_attention(q, pool.k_norm(k), v, sizes, dim**-0.5))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    return out[0] if pool.pool == "token" else out.mean(0)


def reference_siglip_head(head, x, sizes):
    """transformers' ``SiglipMultiheadAttentionPoolingHead`` on one sample's tokens (N, C), by hand
    from the ``nn.MultiheadAttention``'s packed projection."""
    mha = head.attention
    channels, heads = x.shape[-1], mha.num_heads
    weight, bias = mha.in_proj_weight.split(channels), mha.in_proj_bias.split(channels)
    q, k, v = (
        torch.nn.functional.linear(t, w, b).reshape(len(t), heads, -1)
        for t, w, b in zip((head.probe[0], x, x), weight, bias)
    )
    out = mha.out_proj(reference_probe_attention(q, k, v, sizes, (channels // heads) ** -0.5))
    return (out + head.mlp(head.layernorm(out)))[0]


def reference_open_clip_pooler(pool, x, sizes):
    """open_clip's ``AttentionalPooler`` on one sample's tokens (N, C), by hand from its
    ``nn.MultiheadAttention``'s projections (separate ones where ``kdim`` differs from its width)."""
    mha = pool.attn
    width, heads = mha.embed_dim, mha.num_heads
    if mha.in_proj_weight is not None:
        weights = mha.in_proj_weight.split(width)
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    keys = pool.ln_k(x)
    q, k, v = (
        torch.nn.functional.linear(t, w, b).reshape(len(t), heads, -1)
        for t, w, b in zip((pool.ln_q(pool.query), keys, keys), weights, mha.in_proj_bias.split(width))
    )
    return mha.out_proj(reference_probe_attention(q, k, v, sizes, (width // heads) ** -0.5))


def reference_forward_siglip(model, images, layers, keep, method="evit", proportional=None):
    """EViT (or merging) forward of a transformers ``SiglipVisionModel``, sample by sample: each
    layer by hand from its Linears, tokens ranked by the attention they receive, EViT's fused token
    the score-weighted mean of the dropped ones, the head's probe weighing each token by its size.
    Returns ``(last_hidden_state, pooler_output)``."""
    merging = method == "merge"
    proportional = merging if proportional is None else proportional
    keeps = dict(zip(layers, keep if isinstance(keep, (list, tuple)) else [keep] * len(layers)))
    eager = model.config._attn_implementation == "eager"
    hidden, pooled = [], []
    for image in images:
        x = model.embeddings(image[None])
        pos, size = list(range(x.shape[1])), [1] * x.shape[1]
        for index, layer in enumerate(model.encoder.layers):
            attn = layer.self_attn
            h = layer.layer_norm1(x)
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            q, k, v = (p(h).reshape(1, h.shape[1], -1, attn.head_dim).transpose(1, 2) for p in projections)
            logits = (q @ k.transpose(-2, -1)) * attn.scale
            if proportional:
                logits = logits + torch.tensor([math.log(s) for s in size], dtype=x.dtype)
            # "eager": transformers' float32 softmax, which the score is read from before the cast back
            probs = logits.softmax(dim=-1, dtype=torch.float32) if eager else logits.softmax(dim=-1)
            x = x + attn.out_proj((probs.to(x.dtype) @ v).transpose(1, 2).reshape(1, h.shape[1], -1))
            if index in keeps:
                keys = k if merging else None
                x, pos, size = _reorganize_sample(x, probs, pos, size, 0, keeps[index], True, False, True, keys)
            x = x + layer.mlp(layer.layer_norm2(x))
        x = model.post_layernorm(x)
        hidden.append(x[0])
        pooled.append(reference_siglip_head(model.head, x[0], size))
    return hidden, torch.stack(pooled)
