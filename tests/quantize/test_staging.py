"""The staging folder: the output appears whole under its final name or not at all (qtool.quantize.staging)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from qtool.core.errors import BadInput


def test_destination_parent_that_is_a_file_is_refused_before_any_work(tmp_path):
    from qtool.quantize.staging import check_destination

    afile = tmp_path / "afile"
    afile.write_text("x")
    for dest in (afile / "out", afile / "sub" / "out"):
        with pytest.raises(BadInput, match="not a directory") as info:
            check_destination(dest, force=False)
        assert str(afile) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_staging_dir_output_mode_follows_umask_and_keeps_created_parents(tmp_path):
    from qtool.quantize.staging import staging_dir

    dest = tmp_path / "a" / "b" / "out"
    old = os.umask(0o027)
    try:
        with staging_dir(dest) as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (dest / "f").read_text() == "x"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750  # not mkdtemp's 0700
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["out"]


def test_staging_dir_failure_removes_the_parents_it_created(tmp_path):
    from qtool.quantize.staging import staging_dir

    (tmp_path / "keep").mkdir()
    dest = tmp_path / "keep" / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with staging_dir(dest) as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]
    assert list((tmp_path / "keep").iterdir()) == []


def test_force_puts_the_old_destination_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    from qtool.quantize.staging import staging_dir

    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("previous run")
    real_rename = os.rename

    def rename(src, dst):
        if ".qtool-tmp-" in Path(src).name:  # the new output moving into place
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        with staging_dir(dest, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .qtool-old-*, no .qtool-tmp-*
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    monkeypatch.setattr(os, "rename", real_rename)
    with staging_dir(dest, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
