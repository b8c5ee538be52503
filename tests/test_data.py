"""Manifest CSVs: where relative and absolute image paths are read from."""

from __future__ import annotations

import pytest

from evit_patch.bench.data import read_manifest


def _write(path, rows):
    path.write_text("file,label\n" + "".join(f"{f},{label}\n" for f, label in rows))
    return path


def test_paths_relative_to_folder_named_like_csv(tmp_path):
    (tmp_path / "val").mkdir()
    csv = _write(tmp_path / "val.csv", [("a.jpg", 3)])
    assert read_manifest(csv) == [(tmp_path / "val" / "a.jpg", 3)]


def test_paths_relative_to_csv_folder_otherwise(tmp_path):
    csv = _write(tmp_path / "split.csv", [("imgs/a.jpg", 1), ("../b.jpg", 2)])
    assert read_manifest(csv) == [(tmp_path / "imgs" / "a.jpg", 1), (tmp_path / ".." / "b.jpg", 2)]


def test_absolute_paths_kept(tmp_path):
    csv = _write(tmp_path / "abs.csv", [(tmp_path / "x.jpg", 0)])
    assert read_manifest(csv) == [(tmp_path / "x.jpg", 0)]


def test_missing_columns_are_named(tmp_path):
    (tmp_path / "bad.csv").write_text("path,class\na.jpg,1\n")
    with pytest.raises(ValueError, match="expected a CSV with 'file' and 'label' columns"):
        read_manifest(tmp_path / "bad.csv")
