"""What every transformers (5.x) image-encoder family shares: a traceable copy of a layer, and
:class:`TransformersFamily`, which reads the sizes every one of them keeps in ``model.config``.

Two things keep transformers' layers from tracing. The attention dispatches through transformers'
attention registry (opaque to fx), so it is swapped for :class:`TraceableAttention`, which runs
the same query/key/value/output Linear modules through ``scaled_dot_product_attention`` ("sdpa")
or the model file's own ``eager_attention_forward`` ("eager"). And the layer's ``forward`` is
wrapped by ``GradientCheckpointingLayer`` into ``(*args, **kwargs)``, so the copy calls the
unwrapped one, behind a guard against output capture. transformers is never imported here.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
import warnings
import weakref
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import CheckpointError, UnsupportedInputError, UnsupportedModelError
from ..opaque import runtime_guard
from ..token_state import restore
from .base import Family, Recipe, describe

IMPLEMENTATIONS = ("sdpa", "eager")
OUTPUT_OPTIONS = ("output_attentions", "output_hidden_states")


def full_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class TraceableAttention(nn.Module):
    """A transformers self-attention without the registry dispatch, on the same Linear modules.

    Holds the very same ``q_proj``, ``k_proj``, ``v_proj`` and output projection objects, under
    the library's names (``output``: ``"o_proj"`` for ViT/DINOv2, ``"out_proj"`` for CLIP), so
    parameter names are transformers'. Attention dropout is off (the layer is traced in eval mode).
    """

    def __init__(self, attention: nn.Module, implementation: str, output: str = "o_proj", scaling: str = "scaling"):
        super().__init__()
        self.output = output
        for name, module in attention.named_children():  # in the library's order: state_dict keys follow it
            if name in ("q_proj", "k_proj", "v_proj", output):
                self.add_module(name, module)
        self.head_dim, self.implementation = attention.head_dim, implementation
        self.scaling = getattr(attention, scaling)
        # "eager" runs the model file's own function, so it stays what transformers computes.
        self.eager = sys.modules[type(attention).__module__].eager_attention_forward

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
        batch, tokens, _ = hidden_states.shape
        q, k, v = (
            proj(hidden_states).view(batch, tokens, -1, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if self.implementation == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=self.scaling, is_causal=False)
            out = out.transpose(1, 2).contiguous()
        else:
            out, _ = self.eager(self, q, k, v, None, scaling=self.scaling, dropout=0.0)
        return getattr(self, self.output)(out.reshape(batch, tokens, -1).contiguous()), None


@runtime_guard
@fx.wrap
def require_no_output_capture(kwargs: dict, where: str) -> None:
    """Runtime guard: transformers records hidden states/attentions with hooks on its layer classes,
    which a patched layer no longer is, so the tuples would silently miss layers."""
    options = kwargs or {}  # fx's Interpreter (shape propagation) passes an empty ``**kwargs`` as []
    requested = [name for name in OUTPUT_OPTIONS if options.get(name)]
    if requested:
        raise UnsupportedInputError(
            f"{where} was patched by evit_patch: {', '.join(requested)} cannot be honoured (patched layers "
            "are not captured, and later layers see fewer tokens); call without them"
        )


_WARNED_CHECKPOINTING: weakref.WeakSet = weakref.WeakSet()
"""Patched models already told that their patched layers are not checkpointed (once per model)."""


def warn_unchecked_checkpointing(model: nn.Module, where: str, patched: tuple[int, int]) -> None:
    """Warn once per model when it trains with transformers' gradient checkpointing on: transformers
    checkpoints its own layer classes, and the patched layers (``patched``: first and last index) are
    traced graphs, so they keep their activations (the gradients are the same; the memory is not saved)."""
    if not (model.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return
    if model in _WARNED_CHECKPOINTING or not any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return
    _WARNED_CHECKPOINTING.add(model)
    first, last = patched
    warnings.warn(
        f"{where} was patched by evit_patch: gradient checkpointing is on, but only layers before {first} are "
        f"checkpointed; the patched layers {first}-{last} are traced graphs that transformers does not checkpoint, "
        "so they keep their activations (same gradients, more memory than a checkpointed run)",
        UserWarning,
        stacklevel=3,
    )


def refuse_at_call(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    where: str,
    mask_index: int | None,
    patched: tuple[int, int] | None = None,
    dense: bool = False,
    hint: bool = False,
) -> None:
    """Forward pre-hook on a patched transformers model: what it cannot honour is refused at call
    time, whether asked in the call or set in ``model.config`` after patching (transformers reads
    the config then). A padding mask that hides tokens is refused here, so the patched layers can
    ignore the masks transformers builds itself (all-visible ones, under ``torch.export``). Training
    with gradient checkpointing on warns once that the ``patched`` layers are not checkpointed
    (:func:`warn_unchecked_checkpointing`). A ``dense`` model serves ``output_hidden_states``
    (:class:`DenseEncoderForward`)."""
    if patched is not None:
        warn_unchecked_checkpointing(model, where, patched)
    config = model.config
    options = OUTPUT_OPTIONS[:1] if dense else OUTPUT_OPTIONS
    requested = [name for name in options if kwargs.get(name, getattr(config, name, False))]
    if requested:
        served = ""
        if hint and "output_hidden_states" in requested:
            served = "; evit_patch.apply(..., dense=True) serves hidden states restored to every patch"
        raise UnsupportedInputError(
            f"{where} was patched by evit_patch: {', '.join(requested)} cannot be honoured (patched layers "
            f"are not captured, and later layers see fewer tokens{served}); call without them and leave "
            f"config.{requested[0]} False"
        )
    mask = kwargs.get("attention_mask")
    if mask is None and mask_index is not None and len(args) > mask_index:
        mask = args[mask_index]
    if mask is not None and not bool(mask.all()):
        raise UnsupportedInputError(
            f"{where} was patched by evit_patch: it cannot honour a caller-supplied attention_mask that hides "
            "tokens (EViT reorders and drops tokens); call without one"
        )


def install_call_guard(
    model: nn.Module, patched: tuple[int, int] | None = None, dense: bool = False, hint: bool = False
) -> None:
    """Register :func:`refuse_at_call` on a patched model (picklable: a partial of a module function);
    ``patched``: the first and last patched layer, named when checkpointing cannot reach them;
    ``dense``: hidden states are served; ``hint``: they would be with ``dense=True``."""
    params = [p for p in inspect.signature(type(model).forward).parameters.values() if p.name != "self"]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    mask_index = names.index("attention_mask") if "attention_mask" in names else None
    hook = functools.partial(
        refuse_at_call, where=describe(model), mask_index=mask_index, patched=patched, dense=dense, hint=hint
    )
    model.register_forward_pre_hook(hook, with_kwargs=True)


class DenseEncoderForward:
    """``encoder.forward`` of a transformers model patched with ``dense=True``: the library's layer
    loop, with ``hidden_states`` (when asked, in the call or the config) holding the embeddings and
    every layer's output restored to the full patch grid, as the original's are; ``last_hidden_state``
    stays the reduced tokens the model's own head reads. Picklable; copies follow the model."""

    def __init__(self, encoder: nn.Module, layers: str, channels: int, prefix: int, patches: int) -> None:
        self.encoder, self.layers = encoder, layers
        self.channels, self.prefix, self.patches = int(channels), int(prefix), int(patches)

    def __call__(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        # The libraries call it (hidden_states, attention_mask) or (inputs_embeds=..., attention_mask=...).
        first = kwargs.pop("inputs_embeds", kwargs.pop("hidden_states", None))
        args = args if first is None else (first, *args)
        hidden_states, attention_mask = args[0], args[1] if len(args) > 1 else kwargs.pop("attention_mask", None)
        config = self.encoder.config
        wanted = kwargs.get("output_hidden_states", getattr(config, "output_hidden_states", False))
        states = [hidden_states]
        for layer in getattr(self.encoder, self.layers):
            hidden_states = layer(hidden_states, attention_mask)
            if wanted:
                states.append(restore(hidden_states, self.channels, self.prefix, self.patches))
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=tuple(states) if wanted else None)


def traceable_layer(layer: nn.Module, where: str) -> type[nn.Module]:
    """A subclass of the layer's class whose ``forward`` is the unwrapped one, behind the guard.

    The layer ignores the mask its model hands it: a caller's mask that hides tokens is refused by
    the model's call guard (:func:`install_call_guard`), so what reaches a layer is all-visible
    (``None`` in eager mode, a full mask under ``torch.export``), and patched layers see fewer
    tokens than such a mask was built for."""
    unwrapped = inspect.unwrap(type(layer).forward)

    def forward(self, hidden_states: Tensor, *masks, **kwargs) -> Tensor:
        require_no_output_capture(kwargs, where)
        return unwrapped(self, hidden_states, None)

    cls = type(type(layer).__name__, (type(layer),), {"__module__": type(layer).__module__})
    cls.forward = forward  # set after creation: __init_subclass__ would wrap it again
    return cls


def prepare_layer(layer: nn.Module, attribute: str, output: str = "o_proj", scaling: str = "scaling") -> nn.Module:
    """A shallow copy of ``layer`` that traces: unwrapped ``forward``, ``layer.<attribute>`` swapped
    for a :class:`TraceableAttention` on the same Linears. ``layer`` itself is not modified."""
    attention = getattr(layer, attribute)
    prepared = copy.copy(layer)
    prepared.__class__ = traceable_layer(layer, type(layer).__name__)
    prepared._modules = dict(layer._modules)
    implementation = attention.config._attn_implementation
    setattr(prepared, attribute, TraceableAttention(attention, implementation, output, scaling))
    return prepared


def check_encoder(
    model: nn.Module, layers: Iterable[tuple[str, nn.Module]], attribute: str, attention: tuple[str, ...]
) -> None:
    """The checks every transformers family makes: an implementation the traced attention
    reproduces, no output capture in the config, and one of the ``attention`` classes (qualified
    names) at ``layer.<attribute>`` in every layer."""
    who, config = describe(model), model.config
    if config._attn_implementation not in IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"{who} has attn_implementation={config._attn_implementation!r}; expected one of {IMPLEMENTATIONS}"
        )
    requested = [name for name in OUTPUT_OPTIONS if getattr(config, name, False)]
    if requested:
        raise UnsupportedModelError(
            f"{who} has config.{'/'.join(requested)}=True: patched layers are not captured; expected False"
        )
    for name, layer in layers:
        found = getattr(layer, attribute, None)
        if found is None or full_name(type(found)) not in attention:
            expected = " or ".join(n.rsplit(".", 1)[1] for n in attention)
            raise UnsupportedModelError(f"{who}.{name}.{attribute}: expected {expected}, found {type(found).__name__}")


def check_class(model: nn.Module, supported: Iterable[str], why: str) -> None:
    """Refuse a model whose class is not one of ``supported`` (qualified names), naming them and ``why``."""
    if full_name(type(model)) not in supported:
        raise UnsupportedModelError(
            f"{describe(model)} is not supported by evit_patch: expected one of "
            f"{sorted(n.rsplit('.', 1)[1] for n in supported)} ({why})"
        )


def own_size(model: nn.Module, own: tuple[int, int], img_size, why: str = "interpolate_pos_encoding is not used"):
    """``own`` if ``img_size`` is ``None`` or equal to it; anything else is refused, saying ``why``."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size or own)
    if size != own:
        raise UnsupportedModelError(
            f"{describe(model)}: evit_patch patches it at its configured {own[0]}x{own[1]} input only "
            f"({why}); got img_size={img_size!r}"
        )
    return own


def outside_macs(model: nn.Module, embeddings: nn.Module, layers: nn.Module, size: tuple[int, int], weight: Tensor):
    """The embedding's MACs, counted by running it on a ``size`` image; every Linear outside
    ``layers`` (projection, classifier) reads one vector per image."""
    image = torch.zeros(1, model.config.num_channels, *size, device=weight.device, dtype=weight.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        embeddings(image)
    inside = {id(m) for m in layers.modules()}
    heads = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in inside
    )
    return counter.get_total_flops() // 2 + heads


class TransformersFamily(Family):
    """Width, input channels, input size and patch grid, from ``model.config`` as transformers'
    vision configs spell them; each family adds its layers, prefix tokens, pool and head."""

    size_note = "interpolate_pos_encoding is not used"
    """Why another input size is refused (the model is patched at its configured size only)."""

    def channels(self, model: nn.Module) -> int:
        return int(model.config.hidden_size)

    def in_chans(self, model: nn.Module) -> int:
        return int(model.config.num_channels)

    def _size(self, model: nn.Module, img_size) -> tuple[int, int]:
        side = model.config.image_size
        own = (int(side), int(side)) if isinstance(side, int) else tuple(int(s) for s in side)
        return own_size(model, own, img_size, self.size_note)

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        return self._size(model, None)

    def patch_grid(self, model: nn.Module, img_size=None) -> tuple[int, int]:
        height, width = self._size(model, img_size)
        patch = model.config.patch_size
        rows, cols = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return height // rows, width // cols

    def num_tokens(self, model: nn.Module, img_size=None) -> int:
        rows, cols = self.patch_grid(model, img_size)
        return rows * cols + self.num_prefix_tokens(model)

    def resized(self, model: nn.Module, img_size) -> nn.Module:
        self._size(model, img_size)
        return model

    def encoder(self, model: nn.Module) -> str | None:
        """Qualified name of the module whose ``forward`` is the plain loop over the layers and whose
        returned ``hidden_states`` the model hands on (DINOv2): a dense model serves
        ``output_hidden_states`` there. ``None`` where the model collects them by hooks on its layer
        classes (CLIP, SigLIP) or loops in its own forward (ViT): :func:`~evit_patch.restore` in a
        forward hook is the way there."""
        return None

    def install_guards(self, model: nn.Module, first: int, dense: bool = False) -> None:
        blocks = self.blocks(model)
        encoder = self.encoder(model)
        install_call_guard(
            model, (first, len(blocks) - 1), dense=dense and encoder is not None, hint=encoder is not None
        )
        encoder = encoder if dense else None
        if encoder is not None:
            layers = blocks[0][0][len(encoder) + 1 if encoder else 0 :].split(".")[0]
            prefix = self.num_prefix_tokens(model)
            module = model.get_submodule(encoder)
            module.forward = DenseEncoderForward(
                module, layers, self.channels(model), prefix, self.num_tokens(model) - prefix
            )

    def token_outputs(self, model: nn.Module) -> tuple[str, ...]:
        """``last_hidden_state``: the tokens leaving the last layer, as many as the plan keeps."""
        return ("['last_hidden_state']",)

    def recipe(self, model: nn.Module, architecture: str | None = None, model_kwargs: dict | None = None) -> Recipe:
        """The model's class (a transformers class path), its config as a dict and its attention
        implementation (the patched layers re-express that one)."""
        kwargs = {"config": model.config.to_dict(), "attn_implementation": model.config._attn_implementation}
        return Recipe(architecture or full_name(type(model)), {**kwargs, **(model_kwargs or {})})

    def rebuild(self, recipe: Recipe, where: str) -> nn.Module:
        """Only classes of the installed transformers package are instantiated (by name, from JSON)."""
        import importlib

        module, _, name = recipe.architecture.rpartition(".")
        cls = None
        if module.startswith("transformers.models."):
            cls = getattr(importlib.import_module(module), name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "config_class")):
            raise CheckpointError(f"{where}: 'architecture' {recipe.architecture!r} is not a transformers model class")
        kwargs = dict(recipe.model_kwargs)
        try:
            config = cls.config_class.from_dict(kwargs.pop("config"))
            config._attn_implementation = kwargs.pop("attn_implementation", "sdpa")
            return cls(config, **kwargs)
        except Exception as exc:  # transformers raises many types for a config that does not fit
            raise CheckpointError(
                f"{where}: {recipe.architecture} cannot be built from 'model_kwargs' ({type(exc).__name__}: {exc})"
            ) from exc
