"""Atomic writes: a failed write keeps the old file and leaves no temporary; a good one has normal modes."""

from __future__ import annotations

import os
import stat

import pytest

from qmambair.errors import UserError
from qmambair.fileio import atomic_path, exclusive_folder


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_successful_write_replaces_and_uses_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "model.bin"
    old = os.umask(0o022)
    try:
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp != target
            tmp.write_bytes(b"new")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["model.bin"]


def test_a_claimed_folder_is_refused_to_a_second_claim_until_released(tmp_path):
    pytest.importorskip("fcntl")
    folder = tmp_path / "run"
    with exclusive_folder(folder, "training"):
        # a second open file description conflicts like another process would
        with pytest.raises(UserError, match=rf"in use by another training \(process {os.getpid()}\)"):
            with exclusive_folder(folder, "training"):
                pass
    with exclusive_folder(folder):  # released at the end of the block
        assert (folder / ".lock").read_text() == str(os.getpid())
