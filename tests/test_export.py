"""``torch.export``: patch first, export with a dynamic batch, save/load the program, same outputs."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import images, make_vit

import evit_patch
from evit_patch.deploy.export import example_input


@pytest.fixture(scope="module")
def fast():
    """DeiT-Tiny's 196 image tokens through four of its blocks, three reorganizing: the exported graph
    has what twelve would (a TopK per reorganizing block) at a third of the trace."""
    return evit_patch.apply(make_vit(depth=4), layers=[1, 2, 3], keep=0.7)


def _topk_nodes(program):
    return [n for n in program.graph.nodes if n.target == torch.ops.aten.topk.default]


def test_saved_program_runs_any_batch_size_like_eager(fast, tmp_path):
    program = evit_patch.export_program(fast, images(2))
    assert len(_topk_nodes(program)) == 3  # one per reorganizing layer, k fixed by the token count
    assert [n.args[1] for n in _topk_nodes(program)] == [138, 98, 70]  # ceil(0.7 * 196), ceil(0.7 * 139), ...
    path = tmp_path / "deit_tiny_evit.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    for batch in (1, 3, 5):
        x = images(batch, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), fast(x), rtol=0, atol=1e-12)


def test_an_example_batch_of_one_still_exports_a_dynamic_batch(fast):
    program = evit_patch.export_program(fast, images(1))
    x = images(4, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), fast(x), rtol=0, atol=1e-12)


def test_static_batch_refuses_other_batch_sizes(fast):
    program = evit_patch.export_program(fast, images(2), dynamic_batch=False)
    with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[0\] == 2"):
        program.module()(images(3))


def test_example_input_follows_the_model():
    model = evit_patch.apply(make_vit(img_size=160, depth=4), layers=[3], keep=0.5)
    x = example_input(model, 3)
    assert x.shape == (3, 3, 160, 160) and x.dtype == torch.float64


def test_non_image_example_is_refused(fast):
    with pytest.raises(
        evit_patch.UnsupportedInputError, match=r"expected a \(B, C, H, W\) example, got shape \(3, 224, 224\)"
    ):
        evit_patch.export_program(fast, images(1)[0])


def test_onnx_weights_can_go_to_a_side_file(tmp_path):
    pytest.importorskip("onnxscript", reason='needs the onnx extra: pip install "evit_patch[onnx]"')
    pytest.importorskip("onnxruntime", reason='needs the onnx extra: pip install "evit_patch[onnx]"')
    from evit_patch.deploy.export import INPUT_NAME, onnx_session

    fast = evit_patch.apply(make_vit("test_vit", dtype=torch.float32, depth=3), layers=[2], keep=0.5)
    path = evit_patch.export_onnx(fast, tmp_path / "out" / "m.onnx", external_data=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert path.stat().st_size < (path.parent / "m.onnx.data").stat().st_size
    x = example_input(fast, 2, seed=0)
    with torch.no_grad():
        want = fast(x)
    got = torch.from_numpy(onnx_session(path).run(None, {INPUT_NAME: x.numpy()})[0])
    assert torch.equal(got.argmax(-1), want.argmax(-1)) and got.shape == want.shape


def test_onnx_export_refuses_an_existing_file_unless_overwrite(fast, tmp_path):
    """The CLI's --overwrite rule, refused before anything is exported."""
    pytest.importorskip("onnxscript", reason='needs the onnx extra: pip install "evit_patch[onnx]"')
    (tmp_path / "m.onnx").write_bytes(b"old")
    with pytest.raises(
        FileExistsError, match=rf"^{tmp_path / 'm.onnx'} exists \(a file\); pass overwrite=True to replace it"
    ):
        evit_patch.export_onnx(fast, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == b"old"
    with pytest.raises(IsADirectoryError, match=rf"^{tmp_path} is a folder; export_onnx writes a file"):
        evit_patch.export_onnx(fast, tmp_path, overwrite=True)


def test_onnx_attribute_noise_is_dropped_only_while_exporting(caplog):
    """onnx_ir logs "Attribute type is ambiguous" once per index_put (merging's index_add) the exporter lowers;
    export_onnx drops that one message while it runs (tracked.check_onnx asserts none reach the log)."""
    from evit_patch.deploy.export import AMBIGUOUS_ATTRIBUTE, quiet_onnx_attribute_warnings

    logger = logging.getLogger("onnx_ir._convenience")
    noise = f"{AMBIGUOUS_ATTRIBUTE}. Please create an Attr with an explicit type. Defaulted to INTS"
    with caplog.at_level(logging.WARNING, logger="onnx_ir"):
        with quiet_onnx_attribute_warnings():
            logger.warning(noise)
            logger.warning("something else")
        logger.warning(noise)
    assert [r.getMessage() for r in caplog.records] == ["something else", noise]
    assert logger.filters == []
