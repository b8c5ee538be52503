"""What discovery and the output check refuse, by their exact messages (issue 22)."""

from __future__ import annotations

import copy

import peft
import pytest
import timm
import torch
from torch import nn
from vit_zoo import HandViT

import evit_patch
from evit_patch import UnsupportedModelError, token_state
from evit_patch.families import registry
from evit_patch.families.base import Family

SUPPORTED = ", ".join(e.family for e in evit_patch.list_supported() if e.supported)
GUIDE = "docs/adding-a-family.md"


def _seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


def _refusal(model, **options) -> str:
    with pytest.raises(UnsupportedModelError) as info:
        evit_patch.apply(model, layers=[0, 1], keep=0.7, **options)
    return str(info.value)


def test_a_cnn_is_not_a_vit_and_the_message_says_what_was_found():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    assert _refusal(cnn) == (
        "torch.nn.modules.container.Sequential is not a vision transformer evit_patch knows: no registered family "
        "matches it, and structural discovery found no stack of attention blocks run one after another on (batch, "
        "tokens, channels) (found: it takes 3x224x224 images; no module keeps a (batch, tokens, channels) shape); "
        f"supported families: {SUPPORTED}; to add one, see {GUIDE}"
    )


def test_a_module_that_takes_no_image_says_which_sizes_were_tried():
    message = _refusal(nn.Linear(2, 2))
    assert message.startswith(
        "torch.nn.modules.linear.Linear is not a vision transformer evit_patch knows: no registered family matches "
        "it, and structural discovery found no image input it accepts (tried 3x224x224: RuntimeError, "
    )
    assert message.endswith(f"3x512x512: RuntimeError); supported families: {SUPPORTED}; to add one, see {GUIDE}")


class Tokens(HandViT):
    """Returns the normed token sequence: its output reads every token."""

    def tokens(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images):
        return self.tokens(images)


class MaxPool(Tokens):
    def forward(self, images):
        return self.head(self.tokens(images).amax(dim=1))


class SumPool(Tokens):
    def forward(self, images):
        return self.head(self.tokens(images)[:, 1:].sum(dim=1))


FOUND = "3 blocks 'blocks.0'..'blocks.2' of 17 tokens x 32 channels, 1 prefix"
EXPECTED = (
    "and EViT drops and fuses tokens; expected an output that reads only the class token(s) or the mean of the "
    f"image tokens (to support it anyway, see {GUIDE})"
)


@pytest.mark.parametrize(
    ("cls", "why"),
    [
        (Tokens, "its output reads all 17 final tokens, each its own way"),
        (MaxPool, "its output reads all 17 final tokens, each its own way"),
        (SumPool, "its output reads the image tokens through more than their mean (a sum, a maximum, or their count)"),
    ],
    ids=["tokens", "max", "sum"],
)
def test_vits_whose_output_reads_every_token_are_refused_by_name(cls, why):
    assert _refusal(_seeded(cls)) == (
        f"{__name__}.{cls.__qualname__}: discovered a vision transformer ({FOUND}), but {why}, {EXPECTED}"
    )


class RootResidual(nn.Module):
    """Attention and MLP in separate lists, the residual adds in the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        hand = HandViT()
        self.patch_embed, self.cls_token, self.pos_embed = hand.patch_embed, hand.cls_token, hand.pos_embed
        self.attns = nn.ModuleList(b.attn for b in hand.blocks)
        self.mlps = nn.ModuleList(b.mlp for b in hand.blocks)
        self.head = hand.head

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for attn, mlp in zip(self.attns, self.mlps):
            x = x + attn(x)
            x = x + mlp(x)
        return self.head(x[:, 0])


def test_blocks_split_across_the_model_itself_are_refused_with_where():
    assert _refusal(_seeded(RootResidual)) == (
        f"{__name__}.RootResidual: discovered blocks 'attns.0'..'attns.2', but their residual adds are in "
        "RootResidual.forward itself; expected them inside a submodule that runs the blocks (to support it anyway, "
        f"see {GUIDE})"
    )


def test_peft_models_get_a_hint_that_leads_somewhere_and_lora_then_patch_works():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)
    adapted = peft.get_peft_model(vit.eval(), peft.LoraConfig(target_modules=["qkv", "fc1", "fc2"], r=4))
    assert _refusal(adapted) == (
        "PeftModel (vit_tiny_patch16_224) is not itself a vision transformer: it is a peft PeftModel; patch the base "
        "model first and add the adapters to the patched copy (get_peft_model(evit_patch.apply(base), config)), or "
        "merge them (model.merge_and_unload()) and patch the result, or patch the adapted model inside it, whose "
        "LoRA layers are traced as whole projections (evit_patch.apply(model.get_base_model()))"
    )
    fast = evit_patch.apply(adapted.get_base_model(), layers=[0, 1], keep=0.7)  # LoRA layers as leaves
    assert [r.tokens_in for r in evit_patch.explain(fast).rows] == [17, 14, 12]
    x = torch.randn(2, 3, 32, 32)
    evit_patch.set_keep(fast, 1.0)
    with torch.no_grad():
        assert torch.equal(fast(x), adapted(x))


class HiddenStates(HandViT):
    """Also returns every block's output, as some research code does."""

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        states = []
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return self.head(self.norm(x)[:, 0]), states


class _Family(Family):
    """A hand-written family for ``HandViT`` subclasses, as a user would write one."""

    def __init__(self, cls, prepare=None) -> None:
        self.name, self.classes, self.prepare = (
            f"test.{cls.__name__}",
            frozenset({f"{cls.__module__}.{cls.__qualname__}"}),
            prepare,
        )

    def check(self, model):
        return None

    def blocks(self, model):
        return [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]

    def num_prefix_tokens(self, model):
        return 1

    def channels(self, model):
        return 32

    def num_tokens(self, model, img_size=None):
        return 17

    def outside_macs(self, model, img_size=None):
        return 0

    def input_size(self, model):
        return (32, 32)

    def prepare_block(self, block):
        return block if self.prepare is None else self.prepare(block)


@pytest.fixture
def register(monkeypatch):
    def add(family):
        monkeypatch.setattr(registry, "_FAMILIES", [family, *registry._FAMILIES])

    return add


def test_a_family_whose_model_returns_hidden_states_is_refused_before_they_carry_the_token_state(register):
    register(_Family(HiddenStates))
    assert _refusal(_seeded(HiddenStates), method="merge") == (
        "HiddenStates (test.HiddenStates): with tokens reorganized the patched model's output[1][0] has shape "
        f"(1, 13, {32 + token_state.RAW_CHANNELS}), the original's (1, 17, 32): that output reads the tokens EViT "
        "drops and fuses (a per-token "
        "output or hidden state); expected every output to keep its shape"
    )


def test_a_family_for_a_model_whose_output_reads_every_token_is_refused(register):
    register(_Family(Tokens))
    assert _refusal(_seeded(Tokens)) == (
        "Tokens (test.Tokens): with tokens reorganized the patched model's output has shape (1, 12, 32), the "
        "original's (1, 17, 32): that output reads the tokens EViT drops and fuses (a per-token output or hidden "
        "state); expected every output to keep its shape"
    )


def _wrong_scale(block):
    prepared = copy.copy(block)
    prepared._modules = dict(block._modules)
    prepared.attn = copy.copy(block.attn)
    prepared.attn.scale = 2 * block.attn.scale
    return prepared


def test_a_family_that_misdescribes_the_model_is_refused_at_keep_one(register):
    register(_Family(HandViT, prepare=_wrong_scale))
    message = _refusal(_seeded(HandViT))
    assert message.startswith(
        "HandViT (test.HandViT): with every token kept (keep=1.0) the patched model must compute the original's "
        "outputs, but its output differs by up to "
    )
    assert message.endswith("the structure evit_patch read does not match the model's code, so it is not patched")


def test_multihead_attention_left_opaque_by_a_family_points_to_mha_py(register):
    register(_Family(HandViT))
    assert _refusal(_seeded(HandViT, "mha")) == (
        "HandViT.blocks.0: expected exactly one attention op (scaled_dot_product_attention or softmax) in the block, "
        "found 0 (nn.MultiheadAttention at 'attn' is opaque to torch.fx: a family re-expresses it on the same "
        "parameters in prepare_block with evit_patch.families.mha.with_sdpa_attention, as torchvision's does)"
    )


def test_a_discovered_model_is_patched_at_its_own_size_only():
    assert _refusal(_seeded(HandViT), img_size=64) == (
        "HandViT: evit_patch patches a discovered model at the 32x32 input it was discovered at only; got "
        f"img_size=64 (a family can resize it, see {GUIDE})"
    )


@pytest.mark.parametrize("pool", ["token", "avg", "map"])
def test_forward_features_never_carries_the_token_state(pool):
    """Merging moves positions and sizes through the blocks; what forward_features returns has the model's width."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2, global_pool=pool
    ).eval()
    fast = evit_patch.apply(model, layers=[0, 1], keep=0.7, method="merge")
    with torch.no_grad():
        features = fast.forward_features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 10, 32)  # [CLS] + 9 tokens after two merges (16 -> 12 -> 9), 32 channels
