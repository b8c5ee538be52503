"""Export a patched model for deployment: ``torch.export`` and ONNX, with a dynamic batch dimension.

Patch first, export after: exporting the original and patching the program would bake the
sequence length into every view. The token counts EViT keeps depend on the input size alone, so
the exported graph is static in tokens and dynamic in batch only; ONNX uses standard ops
(``TopK``, ``Gather``, ``ScatterElements``, ``MatMul``), which onnxruntime runs as is.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import UnsupportedInputError
from ..families import describe, find_family
from ..graph.outputs import evaluating
from .atomic import write_atomically
from .persist import check_overwrite

BATCH = "batch"
"""Name of the dynamic batch dimension, in the exported program and the ONNX graph."""
INPUT_NAME, OUTPUT_NAME = "images", "logits"
STANDARD_ONNX_DOMAINS = frozenset({"", "ai.onnx"})
_EXTERNAL_DATA_BYTES = 1 << 30
"""Above this many parameter bytes the ONNX weights go to a side file (protobuf stops at 2 GiB)."""


def example_input(model: nn.Module, batch: int = 2, *, seed: int | None = None) -> torch.Tensor:
    """Random images of the size, dtype and device ``model`` expects (a resized model's own size)."""
    param = next(model.parameters())
    family = find_family(model)
    channels, size = family.in_chans(model), family.input_size(model)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, dtype=param.dtype, generator=generator)
    return x.to(param.device)


def _example(model: nn.Module, example: torch.Tensor | None, dynamic_batch: bool) -> torch.Tensor:
    example = example_input(model) if example is None else example
    if example.dim() != 4:
        raise UnsupportedInputError(
            f"export of {describe(model)}: expected a (B, C, H, W) example, got shape {tuple(example.shape)}"
        )
    # A traced batch of 1 would be specialised to 1; only the shape of the example matters.
    if dynamic_batch and example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    return example


def _dynamic_shapes(dynamic_batch: bool) -> tuple[dict, ...] | None:
    return ({0: torch.export.Dim(BATCH, min=1)},) if dynamic_batch else None


AMBIGUOUS_ATTRIBUTE = "Attribute type is ambiguous because it is an empty sequence"
"""What onnx_ir logs once per ``index_put`` the exporter lowers (merging's ``index_add``): onnxscript
builds the op's list of ``None`` indices as an attribute, which is empty there, and its default type
(INTS) is the right one. Nothing the user can act on, so :func:`quiet_onnx_attribute_warnings` drops it."""


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def quiet_onnx_attribute_warnings():
    """Drop :data:`AMBIGUOUS_ATTRIBUTE` from the ``onnx_ir`` logger while the block runs (every other
    record passes; the filter is removed after)."""
    logger, drop = logging.getLogger("onnx_ir._convenience"), _DropMessage(AMBIGUOUS_ATTRIBUTE)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def export_program(
    model: nn.Module, example: torch.Tensor | None = None, *, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` a (patched) model in eval mode; save it with ``torch.export.save``.

    Args:
        model: a model returned by :func:`evit_patch.apply` (an unpatched one exports too).
        example: ``(B, C, H, W)`` images fixing everything but the batch size; default random
            images of the model's input size. A batch of one is widened to two, so that the batch
            dimension is not specialised.
        dynamic_batch: export the batch dimension as ``Dim("batch")``; ``False`` fixes it to the
            example's.

    Returns:
        The exported program; ``program.module()(x)`` runs it for any batch size (>= 1).
    """
    example = _example(model, example, dynamic_batch)
    with evaluating(model):
        return torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(dynamic_batch), strict=False)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example: torch.Tensor | None = None,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    external_data: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to an ONNX file through the dynamo-based exporter; returns the path.

    Needs the ``onnx`` extra (``pip install "evit_patch[onnx]"``). The graph's input is
    ``images`` ``(batch, C, H, W)``, its output ``logits`` ``(batch, classes)``.

    Args:
        model: a model returned by :func:`evit_patch.apply` (an unpatched one exports too).
        path: the ``.onnx`` file to write; its folder is created.
        example: as for :func:`export_program`.
        dynamic_batch: as for :func:`export_program`.
        opset: ONNX opset; default the exporter's.
        external_data: weights in a ``<path>.data`` side file; default only above 1 GiB of
            parameters, so that small models are one self-contained file.
        overwrite: replace an existing file at ``path``; without it one is refused before exporting
            (as the CLI's ``--overwrite``).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is not set.
    """
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; fail early with the fix)
    except ImportError as exc:
        raise ImportError('ONNX export needs onnx and onnxscript: pip install "evit_patch[onnx]"') from exc
    path = Path(path)
    check_overwrite(path, overwrite)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; export_onnx writes a file")
    example = _example(model, example, dynamic_batch)
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter runs torch.export as export_program does, and names the batch.
    with evaluating(model), quiet_onnx_attribute_warnings():
        onnx_program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(dynamic_batch),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            verbose=False,
        )
    if external_data:  # the side file is named after the destination: no temporary name
        onnx_program.save(str(path), external_data=True)
    else:
        write_atomically(path, lambda tmp: onnx_program.save(tmp, external_data=False))
    return path


def onnx_op_types(path: str | os.PathLike) -> dict[str, set[str]]:
    """The op types an ONNX file uses, by domain (``""`` is the standard one), subgraphs included."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found: dict[str, set[str]] = {}

    def visit(graph) -> None:
        for node in graph.node:
            found.setdefault(node.domain, set()).add(node.op_type)
            for attribute in node.attribute:
                for sub in [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs:
                    visit(sub)

    visit(model.graph)
    for function in model.functions:
        found.setdefault(function.domain, set()).add(function.name)
    return found


def onnx_session(path: str | os.PathLike, *, threads: int | None = None):
    """An onnxruntime CPU ``InferenceSession`` for ``path``; ``threads`` sets its intra-op threads."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError('running ONNX needs onnxruntime: pip install "evit_patch[onnx]"') from exc
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
