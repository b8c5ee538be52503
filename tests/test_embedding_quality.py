"""Embedding models compared by the cosine of their embeddings and by zero-shot classes (evaluate)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from conftest import SHARED, images, make_vit
from PIL import Image

import evit_patch
from evit_patch.bench.data import read_class_names
from evit_patch.bench.quality import compare_embeddings, embedding_of, is_embedding_model, zero_shot_classes
from evit_patch.commands import evaluate


class Rotated(torch.nn.Module):
    """``model``'s embedding turned by ``angle`` in each plane of coordinates (2i, 2i + 1): every
    embedding keeps its norm and has cosine exactly cos(angle) with the original."""

    def __init__(self, model: torch.nn.Module, angle: float) -> None:
        super().__init__()
        self.model, self.angle = model, angle

    def forward(self, x):
        e = self.model(x)
        even, odd = e[:, 0::2], e[:, 1::2]
        c, s = math.cos(self.angle), math.sin(self.angle)
        return torch.stack([c * even - s * odd, s * even + c * odd], dim=-1).flatten(1)


def _encoder():
    """A timm ViT without a classifier: its output is a 64-wide embedding."""
    return make_vit(
        "vit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=0
    )


def test_identical_models_have_cosine_one():
    model = _encoder()
    c = compare_embeddings(model, model, images(5, 32), progress=False)
    assert c.images == 5 and c.mean_cosine == pytest.approx(1, abs=1e-6) and c.min_cosine == pytest.approx(1, abs=1e-6)
    assert (c.zero_shot_agreement, c.top1_original, c.top1_patched) == (None, None, None)


def test_a_rotation_gives_its_cosine():
    model = _encoder()
    c = compare_embeddings(model, Rotated(model, 0.5), images(5, 32), batch_size=2, progress=False)
    assert c.mean_cosine == pytest.approx(math.cos(0.5), abs=1e-6)
    assert c.min_cosine == pytest.approx(math.cos(0.5), abs=1e-6)


def test_zero_shot_agreement_and_accuracy():
    """The zero-shot class is the nearest class embedding; counted image by image here."""
    model, x = _encoder(), images(12, 32)
    classes = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(12) % 5
    turned = Rotated(model, 1.0)
    c = compare_embeddings(model, turned, x, labels, classes=classes, batch_size=5, progress=False)

    def nearest(embedding):
        return max(range(5), key=lambda k: torch.cosine_similarity(embedding, classes[k].double(), dim=0).item())

    with torch.no_grad():
        pick = [[nearest(embedding) for embedding in m(x)] for m in (model, turned)]
    assert c.zero_shot_agreement == sum(a == b for a, b in zip(*pick)) / 12 < 1
    assert c.top1_original == sum(p == y for p, y in zip(pick[0], labels.tolist())) / 12
    assert c.top1_patched == sum(p == y for p, y in zip(pick[1], labels.tolist())) / 12
    same = compare_embeddings(model, model, x, labels, classes=classes, progress=False)
    assert same.zero_shot_agreement == 1 and same.top1_patched == same.top1_original == c.top1_original


def test_embedding_of_transformers_outputs():
    outputs = pytest.importorskip("transformers.modeling_outputs")
    t, u = torch.ones(2, 4), torch.zeros(2, 4)
    assert embedding_of(t) is t
    assert embedding_of(outputs.BaseModelOutputWithPooling(last_hidden_state=u, pooler_output=t)) is t
    clip = pytest.importorskip("transformers.models.clip.modeling_clip")
    assert embedding_of(clip.CLIPVisionModelOutput(image_embeds=t, last_hidden_state=u)) is t
    with pytest.raises(TypeError, match="expected an embedding: a tensor, or an output with image_embeds or pooler_"):
        embedding_of(outputs.BaseModelOutput(last_hidden_state=u))


def test_is_embedding_model():
    x = images(1, 32)
    encoder, classifier = _encoder(), make_vit("vit_base_patch16_224", img_size=32, patch_size=8, depth=1)
    assert is_embedding_model(encoder, encoder(x)) and not is_embedding_model(classifier, classifier(x))
    outputs = pytest.importorskip("transformers.modeling_outputs")
    assert not is_embedding_model(torch.nn.Identity(), outputs.ImageClassifierOutput(logits=torch.ones(1, 3)))


def test_zero_shot_classes_prompts_each_name():
    seen = []

    def encode_text(texts):
        seen.extend(texts)
        return torch.tensor([[3.0, 4.0]] * len(texts))

    classes = zero_shot_classes(encode_text, ["tench", "goldfish", "shark"], batch_size=2)
    assert seen == ["a photo of a tench.", "a photo of a goldfish.", "a photo of a shark."]
    torch.testing.assert_close(classes, torch.tensor([[0.6, 0.8]] * 3))


def test_imagenet_class_names(tmp_path):
    path = SHARED / "labels" / "imagenet1k_classes.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    names = read_class_names(path)
    assert len(names) == 1000 and names[:2] == ["tench", "goldfish"]
    (tmp_path / "bad.csv").write_text("index,name\n1,a\n")
    with pytest.raises(evit_patch.EViTError, match=r"bad\.csv: expected indices 0\.\.0, each once"):
        read_class_names(tmp_path / "bad.csv")


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def test_evaluate_command_on_an_open_clip_model(tmp_path):
    """``--model open_clip:ARCH``: the vision tower patched, the text tower's class embeddings from the
    class-name CSV; keep 1.0 leaves every embedding (and so every zero-shot class) as it was."""
    open_clip = pytest.importorskip("open_clip")
    (tmp_path / "Tiny-EViT-CLIP.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "Tiny-EViT-CLIP.json")
    generator = torch.Generator().manual_seed(0)
    rows = ["file,label"]
    for i in range(6):
        pixels = torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{i % 3}")
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.csv").write_text('index,wnid,name\n0,n0,"tench, Tinca"\n1,n1,goldfish\n2,n2,shark\n')
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    argv = ["--model", "open_clip:Tiny-EViT-CLIP", "--data", str(tmp_path / "set.csv"), "--layers", "1", "2"]
    argv += ["--classes", str(tmp_path / "classes.csv"), "--keep", "1.0", "0.5", "--sweep"]
    torch.manual_seed(0)
    full, pruned = evaluate.run(parser.parse_args(argv))
    assert full["images"] == 6 and full["zero_shot_agreement"] == 1.0
    assert full["min_cosine"] == pytest.approx(1, abs=1e-5) and full["top1_patched"] == full["top1_original"]
    assert pruned["min_cosine"] <= pruned["mean_cosine"] < 1 - 1e-4 and pruned["gmacs"] < full["gmacs"]


def test_open_clip_model_errors_are_usage_errors():
    pytest.importorskip("open_clip")
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    unknown = parser.parse_args(["--model", "open_clip:ViT-X", "--data", "x.csv"])
    with pytest.raises(evit_patch.EViTError, match=r"^open_clip has no model named 'ViT-X'; see open_clip\."):
        evaluate.run(unknown)
    hub = parser.parse_args(["--model", "open_clip:ViT-B-32", "--pretrained", "--data", "x.csv"])
    with pytest.raises(evit_patch.EViTError, match=r"give open_clip's weights file as --checkpoint, not --pretrained"):
        evaluate.run(hub)


def test_transformers_towers_are_compared_by_their_embeddings():
    """A patched transformers CLIP tower: ``image_embeds`` compared (keep 1.0: identical), detected as an embedding."""
    pytest.importorskip("transformers")
    from cases import clip_images, small_hf_clip

    model, x = small_hf_clip(), clip_images()
    assert is_embedding_model(model, model(x[:1]))
    same = compare_embeddings(model, evit_patch.apply(model, layers=[1], keep=1.0), x, progress=False)
    assert same.min_cosine == pytest.approx(1, abs=1e-6)
    fast = evit_patch.apply(model, layers=[1], keep=0.5)
    moved = compare_embeddings(model, fast, x, progress=False)
    with torch.no_grad():
        want = torch.cosine_similarity(model(x).image_embeds, fast(x).image_embeds).min().item()
    assert moved.min_cosine == pytest.approx(want, abs=1e-6) and want < 1 - 1e-4
