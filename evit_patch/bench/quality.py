"""Accuracy of a patched model and its agreement with the original, on the same batches.

Classifiers are compared by their predictions (:func:`compare`); embedding models (no classifier
head: open_clip's visual towers, transformers' ``*Model``/``CLIPVisionModel``, timm with
``num_classes=0``) by the cosine similarity of their embeddings and, where a text tower gives
class embeddings, by the zero-shot class they pick (:func:`compare_embeddings`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm


@dataclass(frozen=True)
class Comparison:
    """Original vs patched on one labelled set (fractions in [0, 1])."""

    images: int
    top1_original: float
    top1_patched: float
    top5_original: float
    top5_patched: float
    agreement: float
    """Fraction of images where both models predict the same class."""
    mean_kl: float
    """Mean KL(original || patched) of the softmax outputs, in nats."""


@torch.inference_mode()
def compare(
    original: nn.Module,
    patched: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 64,
    progress: bool = True,
    original_images: torch.Tensor | None = None,
) -> Comparison:
    """Run both models batch by batch and compare their predictions.

    ``original_images``: the same images preprocessed for the original model, when the patched
    model runs at another resolution (same-cost higher resolution).
    """
    original_images = images if original_images is None else original_images
    stats = torch.zeros(6, dtype=torch.float64)
    device = next(original.parameters()).device
    for start in tqdm(range(0, len(images), batch_size), desc="evaluating", disable=not progress):
        x = images[start : start + batch_size].to(device)
        x_original = original_images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        a, b = original(x_original).float(), patched(x).float()
        top5_a, top5_b = a.topk(5, dim=-1).indices, b.topk(5, dim=-1).indices
        stats += torch.tensor(
            [
                (top5_a[:, 0] == y).sum().item(),
                (top5_b[:, 0] == y).sum().item(),
                (top5_a == y[:, None]).any(-1).sum().item(),
                (top5_b == y[:, None]).any(-1).sum().item(),
                (top5_a[:, 0] == top5_b[:, 0]).sum().item(),
                torch.nn.functional.kl_div(
                    b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="sum"
                ).item(),
            ],
            dtype=torch.float64,
        )
    n = len(images)
    return Comparison(n, *(float(s) / n for s in stats))


def embedding_of(output) -> Tensor:
    """The embedding in a model's output: the tensor itself, or a transformers output's
    ``image_embeds`` (``*WithProjection``) or ``pooler_output``, in that order."""
    if isinstance(output, Tensor):
        return output
    for name in ("image_embeds", "pooler_output"):
        value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(
        f"expected an embedding: a tensor, or an output with image_embeds or pooler_output; got {type(output).__name__}"
    )


def is_embedding_model(model: nn.Module, output) -> bool:
    """Whether ``output`` (of ``model``) is an embedding rather than class logits: no ``logits`` field
    and no classifier (``num_classes`` absent or 0, as for open_clip's towers and timm's ``num_classes=0``)."""
    if getattr(output, "logits", None) is not None or (isinstance(output, dict) and "logits" in output):
        return False
    return not getattr(model, "num_classes", 0)


@dataclass(frozen=True)
class EmbeddingComparison:
    """Original vs patched embeddings of the same images; zero-shot fields are ``None`` without class embeddings."""

    images: int
    mean_cosine: float
    """Mean cosine similarity between each image's original and patched embedding."""
    min_cosine: float
    """The lowest of them: the image the patch moved most."""
    zero_shot_agreement: float | None = None
    """Fraction of images whose zero-shot class (nearest class embedding) is the same for both."""
    top1_original: float | None = None
    """Zero-shot accuracy against the labels."""
    top1_patched: float | None = None


@torch.inference_mode()
def compare_embeddings(
    original: nn.Module,
    patched: nn.Module,
    images: Tensor,
    labels: Tensor | None = None,
    *,
    classes: Tensor | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> EmbeddingComparison:
    """Run both models batch by batch and compare their embeddings (see :func:`embedding_of`).

    Args:
        classes: ``(num_classes, D)`` class embeddings in the models' output space (for CLIP,
            :func:`zero_shot_classes` of the text tower): each image's zero-shot class is the one
            of highest cosine similarity, compared between the models and, given ``labels``, with them.
    """
    device = next(original.parameters()).device
    cosines, same, right_a, right_b = [], 0, 0, 0
    if classes is not None:
        classes = F.normalize(classes.to(device).float(), dim=-1)
    for start in tqdm(range(0, len(images), batch_size), desc="evaluating", disable=not progress):
        x = images[start : start + batch_size].to(device)
        a = F.normalize(embedding_of(original(x)).float().flatten(1), dim=-1)
        b = F.normalize(embedding_of(patched(x)).float().flatten(1), dim=-1)
        cosines.append((a * b).sum(-1).double().cpu())
        if classes is not None:
            class_a, class_b = (a @ classes.T).argmax(-1), (b @ classes.T).argmax(-1)
            same += (class_a == class_b).sum().item()
            if labels is not None:
                y = labels[start : start + batch_size].to(device)
                right_a, right_b = right_a + (class_a == y).sum().item(), right_b + (class_b == y).sum().item()
    cosine, n = torch.cat(cosines), len(images)
    zero_shot = classes is not None
    return EmbeddingComparison(
        n,
        cosine.mean().item(),
        cosine.min().item(),
        same / n if zero_shot else None,
        right_a / n if zero_shot and labels is not None else None,
        right_b / n if zero_shot and labels is not None else None,
    )


@torch.inference_mode()
def zero_shot_classes(
    encode_text: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    template: str = "a photo of a {}.",
    *,
    batch_size: int = 250,
) -> Tensor:
    """``(num_classes, D)`` unit class embeddings from a text tower, one prompt per class.

    ``encode_text`` maps prompts to embeddings, e.g. for open_clip
    ``lambda texts: model.encode_text(tokenizer(texts))``.
    """
    prompts = [template.format(name) for name in class_names]
    chunks = [encode_text(prompts[i : i + batch_size]).float() for i in range(0, len(prompts), batch_size)]
    return F.normalize(torch.cat(chunks), dim=-1)
