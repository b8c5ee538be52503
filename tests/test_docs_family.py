"""docs/adding-a-family.md: its one-file example runs as written and patches the model it is for."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from vit_zoo import Block

import evit_patch
from evit_patch.families import find_family, registry

PAGE = Path(__file__).resolve().parents[1] / "docs" / "adding-a-family.md"


def _example() -> str:
    text = PAGE.read_text()
    section = text[text.index("## A new family, in one file") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class ViT(nn.Module):
    """The ``mylib.models.ViT`` the example is written for."""

    def __init__(self, pool: str = "cls") -> None:
        super().__init__()
        self.pool, self.dim, self.image_size, self.patch = pool, 32, 32, 8
        self.embed = nn.Sequential(nn.Conv2d(3, 32, 8, 8), nn.Flatten(2))
        self.cls = nn.Parameter(torch.randn(1, 1, 32))
        self.layers = nn.ModuleList(Block(32, 2, "matmul") for _ in range(3))
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, images):
        x = torch.cat([self.cls.expand(len(images), -1, -1), self.embed(images).transpose(1, 2)], dim=1)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(dim=1))


@pytest.fixture
def mylib(monkeypatch):
    package, models = types.ModuleType("mylib"), types.ModuleType("mylib.models")
    ViT.__module__, ViT.__qualname__ = "mylib.models", "ViT"
    models.ViT, package.models = ViT, models
    monkeypatch.setitem(sys.modules, "mylib", package)
    monkeypatch.setitem(sys.modules, "mylib.models", models)
    monkeypatch.setattr(registry, "_FAMILIES", list(registry._FAMILIES))
    exec(compile(_example(), str(PAGE), "exec"), {"__name__": "my_vit"})
    return models


def test_the_one_file_example_runs_as_written_and_patches(mylib):
    torch.manual_seed(0)
    model = mylib.ViT().eval()
    assert find_family(model).name == "mylib.ViT"
    fast = evit_patch.apply(model, layers=[0, 1], keep=0.7)
    explanation = evit_patch.explain(fast)
    assert explanation.family == "mylib.ViT"
    assert [row.tokens_in for row in explanation.rows] == [17, 14, 12]
    x = torch.randn(2, 3, 32, 32)
    evit_patch.set_keep(fast, 1.0)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_the_example_refuses_what_it_says_it_refuses(mylib):
    with pytest.raises(
        evit_patch.UnsupportedModelError,
        match=r"^ViT has pool='mean': its output depends on every image token, which EViT drops and fuses; "
        r"expected pool='cls'$",
    ):
        evit_patch.apply(mylib.ViT(pool="mean"), layers=[0], keep=0.7)
