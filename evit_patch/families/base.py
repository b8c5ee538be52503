"""What a model family tells the core pass; a new family implements this in one file."""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..errors import CheckpointError, UnsupportedModelError
from ..options import Pool, Score


def describe(model: nn.Module) -> str:
    """``"VisionTransformer (deit_small_patch16_224)"``: the class, and the architecture if known."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{type(model).__name__} ({arch})" if arch else type(model).__name__


def class_path_of(model: nn.Module) -> str:
    """``"timm.models.resnet.ResNet (resnet18)"``: the full class path, and the architecture if known."""
    cls = type(model)
    name = f"{cls.__module__}.{cls.__qualname__}"
    described = describe(model)
    return name + described[len(cls.__name__) :]


def foreign_override(model: nn.Module, base: type, methods: tuple[str, ...], package: str) -> str | None:
    """The first of ``methods`` that a class between ``type(model)`` and ``base``, from outside
    ``package``, defines anew (``"models_vit.VisionTransformer.forward_features"``), else ``None``: a
    family knows its library's code, not a subclass's own forward (discovery reads that one)."""
    for cls in type(model).__mro__:
        if cls is base:
            return None
        if not cls.__module__.startswith(package):
            for method in methods:
                if method in vars(cls):
                    return f"{cls.__module__}.{cls.__qualname__}.{method}"
    return None


def class_path(model: nn.Module) -> set[str]:
    """Fully qualified names of the model's class and its bases: matching without importing."""
    return {f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__}


@dataclass(frozen=True)
class Recipe:
    """What rebuilds an architecture: a name its library resolves and the constructor arguments."""

    architecture: str
    model_kwargs: dict


class Family(abc.ABC):
    """A model family the pass understands (or refuses by name, with the reason)."""

    name: str
    """Short name, as ``list_supported`` shows it, e.g. ``"timm.VisionTransformer"``."""
    supported: bool = True
    notes: str = ""
    classes: frozenset[str] = frozenset()
    """Qualified names of the classes the family is for (``"timm.models.beit.Beit"``): where two
    families match a model, the one whose class is nearer the model's own class wins."""

    def specificity(self, model: nn.Module) -> int:
        """Position in ``type(model).__mro__`` of the first class this family claims (lower is more
        specific); a family that names no classes ranks after every one that does."""
        for depth, cls in enumerate(type(model).__mro__):
            if f"{cls.__module__}.{cls.__qualname__}" in self.classes:
                return depth
        return len(type(model).__mro__)

    def matches(self, model: nn.Module) -> bool:
        """Whether this family is responsible for ``model``: by default, whether one of ``classes``
        is the model's class or a base of it (matched by name, so the library need not be imported)."""
        return bool(self.classes & class_path(model))

    @abc.abstractmethod
    def check(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` if EViT is unsound for this configuration."""

    @abc.abstractmethod
    def blocks(self, model: nn.Module) -> Sequence[tuple[str, nn.Module]]:
        """The transformer blocks in execution order, with their qualified names."""

    @abc.abstractmethod
    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the image tokens (class, distillation, registers); never dropped."""

    @abc.abstractmethod
    def channels(self, model: nn.Module) -> int:
        """Width of the residual stream."""

    @abc.abstractmethod
    def num_tokens(self, model: nn.Module, img_size: tuple[int, int] | None = None) -> int:
        """Tokens entering the first block for an input of ``img_size`` (default: the model's)."""

    @abc.abstractmethod
    def outside_macs(self, model: nn.Module, img_size: tuple[int, int] | None = None) -> int:
        """MACs per sample outside the blocks (embedding, head); token pruning leaves them as is."""

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        """``(height, width)`` of the images ``model`` was built for."""
        raise UnsupportedModelError(f"{describe(model)}: evit_patch does not know this family's input size")

    def in_chans(self, model: nn.Module) -> int:
        """Channels of the images ``model`` takes (RGB unless the family says otherwise)."""
        return 3

    def patch_grid(self, model: nn.Module, img_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """``(rows, columns)`` of image tokens for an input of ``img_size`` (default: the model's)."""
        raise UnsupportedModelError(f"{describe(model)}: evit_patch does not know this family's patch grid")

    def resized(self, model: nn.Module, img_size: int | tuple[int, int]) -> nn.Module:
        """A copy of ``model`` that takes ``img_size`` inputs (position embeddings resampled)."""
        raise UnsupportedModelError(f"{describe(model)}: evit_patch cannot change this family's input size")

    def prepare_copy(self, model: nn.Module) -> None:
        """Called once on the copy being patched, before its blocks are traced: a family whose blocks
        are not modules of their own (residual adds in the module that runs them) makes them so
        here, keeping every parameter under its name. Must compute exactly what it did before."""
        return None

    def prepare_block(self, block: nn.Module) -> nn.Module:
        """The block as the tracer should see it; a family re-expresses opaque modules here.

        Must not modify ``block``, and must keep its parameters (the same objects, under the
        same names), so the patched model's ``state_dict`` keys are the original's.
        """
        return block

    def score(self, model: nn.Module) -> Score:
        """What ranks the image tokens: the [CLS] row (EViT), or received attention without a class token."""
        return Score.CLS

    def pool(self, model: nn.Module) -> Pool:
        """How the head reads the last block's tokens: :attr:`Pool.TOKEN` (prefix tokens only),
        :attr:`Pool.AVG` (an average of the image tokens, so a fused token must count as the tokens
        it stands for) or :attr:`Pool.ATTENTION` (a probe attends over the tokens: a fused token
        must weigh as the tokens it stands for in its softmax; see :meth:`pool_module`)."""
        return Pool.TOKEN

    def pool_module(self, model: nn.Module) -> str:
        """``pool is Pool.ATTENTION``: qualified name of the attention-pool module, which is called on
        the final norm's output (possibly minus the prefix rows, see :meth:`pool_prefix_tokens`)."""
        raise UnsupportedModelError(f"{describe(model)}: evit_patch does not know this family's attention pool")

    def pool_prefix_tokens(self, model: nn.Module) -> int:
        """Prefix rows the attention pool reads before the image tokens (0 where they are sliced off)."""
        return 0

    def pool_macs_per_token(self, model: nn.Module) -> int:
        """MACs the head spends per token it reads (an attention pool's key and value projections
        and its probe's logits and weighted sum); ``explain`` multiplies them by the final token
        count. The head's other MACs belong in :meth:`outside_macs`."""
        return 0

    def feature_maps(self, model: nn.Module) -> bool:
        """Whether the model's output gives every patch a feature (a backbone's feature maps): a reduced
        copy must then carry which token stands for each patch (``dense=True``, the default for it)."""
        return False

    def confine_state(self, model: nn.Module) -> None:
        """Called on the patched copy when the final norm passes the token state on to an attention
        pool: a family whose model also returns the normed tokens (``forward_features``,
        ``last_hidden_state``) removes the state channels there
        (:func:`~evit_patch.token_state.strip`), so users see the library's output width."""
        return None

    def token_outputs(self, model: nn.Module) -> tuple[str, ...]:
        """Outputs that return the final tokens by design, as pytree key paths of the model's output
        (``"['last_hidden_state']"``): their token count follows the plan, while their batch and
        channel sizes must stay the original's. Every other output must keep its shape exactly
        (the output check refuses a patched model otherwise)."""
        return ()

    def install_guards(self, model: nn.Module, first: int, dense: bool = False) -> None:
        """Called on the patched copy: shadow library methods that cannot serve a model that
        reorganizes from block ``first`` on, with instance attributes that refuse with the reason
        or serve what is sound (the class itself is never changed). ``dense``: block outputs carry
        their owners, so per-block outputs are served as full grids (:func:`~evit_patch.token_state.restore`)."""
        return None

    def rotary_args(self, model: nn.Module) -> tuple[str, ...]:
        """Block arguments holding a per-image-token rotary table; they stay graph inputs."""
        return ()

    def live_args(self, model: nn.Module) -> tuple[str, ...]:
        """Block arguments the model always passes, kept as graph inputs: the rotary tables, and
        tensors such as a position bias shared by all blocks (found in the graph like any bias)."""
        return self.rotary_args(model)

    def block_inputs(self, model: nn.Module, index: int) -> dict[str, torch.Tensor]:
        """Values of :meth:`live_args` for block ``index``, to run a traced block once."""
        return {}

    def final_norm(self, model: nn.Module) -> str | None:
        """Name of the per-token module between the last block and the pool, where the tokens'
        positions and sizes are split off. ``None``: none exists (CLIP's ``post_layernorm`` reads
        the pooled class token only), so the last block returns the bare tokens (token pools), or,
        for an attention pool that normalises its own keys (open_clip's ``AttentionalPooler``), the
        tokens with their state, which the pool splits off itself."""
        return "norm"

    def leaf_types(self) -> tuple[type[nn.Module], ...]:
        """Module types the tracer must not enter (mode-dependent helpers)."""
        return ()

    def recipe(self, model: nn.Module, architecture: str | None = None, model_kwargs: dict | None = None) -> Recipe:
        """How :meth:`rebuild` makes this architecture again, randomly initialised, as JSON data:
        what ``save_pretrained`` records beside the weights (``architecture``/``model_kwargs``:
        the caller's overrides). Nothing executable is recorded."""
        raise CheckpointError(
            f"save_pretrained: evit_patch does not know how to rebuild {describe(model)} ({self.name}) from a "
            "file; save the whole model with torch.save(model, path) (load it with torch.load(path, "
            "weights_only=False)), or save model.state_dict() and re-apply the same plan to a fresh model"
        )

    def rebuild(self, recipe: Recipe, where: str) -> nn.Module:
        """The architecture :meth:`recipe` recorded, randomly initialised (``where``: the file, for errors)."""
        raise CheckpointError(f"{where}: evit_patch cannot rebuild a {self.name} model")


def attention_pool_macs(pool: nn.Module, channels: int) -> tuple[int, int]:
    """``(fixed, per_token)`` MACs of an attention-pool module, counted by running it on one and
    on two tokens: with a fixed probe its cost is linear in the tokens it reads. SDPA runs as
    matmuls (as ``explain`` counts every attention), which the counter sees on any backend."""
    # A copy without gradients: FlopCounterMode's module hooks fail on a view of a parameter that
    # requires grad made under no_grad (timm's ``latent.expand``), even in an inference-only run.
    pool = copy.deepcopy(pool).requires_grad_(False)
    param = next(pool.parameters())
    counts = []
    for tokens in (1, 2):
        x = torch.zeros(1, tokens, channels, device=param.device, dtype=param.dtype)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            pool(x)
        counts.append(counter.get_total_flops() // 2)
    per_token = counts[1] - counts[0]
    return counts[0] - per_token, per_token


class RefusedFamily(Family):
    """A family known not to work yet: matched by class name so its package need not be installed."""

    supported = False

    def __init__(self, name: str, class_names: set[str], reason: str) -> None:
        self.name, self.class_names, self.notes = name, class_names, reason
        self.classes = frozenset(class_names)

    def check(self, model: nn.Module) -> None:
        raise UnsupportedModelError(f"{describe(model)} is not supported by evit_patch: {self.notes}")

    def _never(self, *args, **kwargs):  # pragma: no cover - check() always raises first
        raise NotImplementedError

    blocks = num_prefix_tokens = channels = num_tokens = outside_macs = _never
