"""ONNX through the dynamo exporter: standard ops only, dynamic batch, onnxruntime matches eager on real data."""

from __future__ import annotations

import pytest
import torch

import evit_patch
from evit_patch.deploy.export import BATCH, INPUT_NAME, STANDARD_ONNX_DOMAINS, onnx_op_types, onnx_session

onnx = pytest.importorskip("onnx", reason='needs the onnx extra: pip install "evit_patch[onnx]"')
pytest.importorskip("onnxscript", reason='needs the onnx extra: pip install "evit_patch[onnx]"')
pytest.importorskip("onnxruntime", reason='needs the onnx extra: pip install "evit_patch[onnx]"')

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("onnx")]  # one worker: the module fixture is built once


@pytest.fixture(scope="module")
def exported(real_model, tmp_path_factory):
    """Genuine DeiT-Tiny patched at keep 0.7 @ 3, 6, 9, exported once for every test here."""
    fast = evit_patch.apply(real_model, layers=[3, 6, 9], keep=0.7)
    path = evit_patch.export_onnx(fast, tmp_path_factory.mktemp("onnx") / "deit_tiny_evit.onnx")
    return fast, path


def test_onnxruntime_matches_eager_on_real_images(exported, real_val_images):
    fast, path = exported
    images, _ = real_val_images
    session = onnx_session(path)
    for x in (images[:1], images[1:]):  # batch 1 and batch 74: one file, any batch size
        got = torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
        with torch.no_grad():
            want = fast(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_graph_has_standard_ops_only(exported):
    _, path = exported
    ops = onnx_op_types(path)
    assert set(ops) <= STANDARD_ONNX_DOMAINS, f"non-standard domains: {set(ops) - STANDARD_ONNX_DOMAINS}"
    standard = set().union(*ops.values())
    assert {"TopK", "Gather", "ScatterElements", "MatMul", "Softmax"} <= standard, sorted(standard)
    model = onnx.load(str(path))
    assert not model.functions
    assert sum(node.op_type == "TopK" for node in model.graph.node) == 3
    onnx.checker.check_model(model, full_check=True)


def test_batch_dimension_is_symbolic_and_file_is_self_contained(exported):
    _, path = exported
    model = onnx.load(str(path))
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == INPUT_NAME and dims[0].dim_param == BATCH
    assert [d.dim_value for d in dims[1:]] == [3, 224, 224]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no side file, no temporary left


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("beit_base_patch16_224", dict(embed_dim=64, num_heads=4)),  # relative position bias (as RelPos ViTs)
        ("eva02_tiny_patch14_224", dict(img_size=56)),  # rotary tables
        ("vit_medium_patch16_gap_256", dict(embed_dim=64, num_heads=4)),  # received score, size-weighted pool
    ],
)
def test_position_aware_families_export(name, options, tmp_path):
    from conftest import images, make_vit
    from tracked import randomise

    options = dict(img_size=64, depth=3, num_classes=10) | options
    model = randomise(make_vit(name, dtype=torch.float32, **options))
    fast = evit_patch.apply(model, layers=[1, 2], keep=0.7)
    x = images(3, size=options["img_size"], dtype=torch.float32)
    path = evit_patch.export_onnx(fast, tmp_path / "model.onnx", x[:2])
    assert set(onnx_op_types(path)) <= STANDARD_ONNX_DOMAINS  # the gathers lower to standard ops
    got = torch.from_numpy(onnx_session(path).run(None, {INPUT_NAME: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, fast(x), rtol=0, atol=1e-4)
