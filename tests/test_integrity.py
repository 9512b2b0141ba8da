"""Damaged files are refused, intact ones load: float ``.safetensors`` carry a SHA-256 of their tensors (the
shipped float models too), training checkpoints a SHA-256 of their content; files without one (official,
foreign, or written before the checksum existed) load unchecked. Killed atomic writes leave temporary files
that the next write of the same file removes.

The checksum of a ``.safetensors`` file is recomputed here from the file's own bytes (header parsed by hand),
not with the code under test.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qmambair.cli import main
from qmambair.data import write_image
from qmambair.fileio import atomic_path
from qmambair.loading import load_model
from qmambair.models import build_model
from qmambair.models.checkpoint import CheckpointError, save_model
from qmambair.models.shipped import list_shipped, shipped_path
from qmambair.train.checkpoint import atomic_save, load_checkpoint, training_checkpoint

DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
          "I32": "int32", "U8": "uint8", "I8": "int8", "BOOL": "bool", "I16": "int16"}


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and the offset where the tensor data starts (format: u64 LE length)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), 8 + n


def oracle_checksum(path: Path) -> str:
    """SHA-256 over the tensors in name order: name, dtype, shape and raw bytes, as the file stores them."""
    header, start = read_header(path)
    raw = path.read_bytes()
    h = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        a, b = info["data_offsets"]
        h.update(f"{name}\0{DTYPES[info['dtype']]}\0{list(info['shape'])}\0".encode())
        h.update(raw[start + a : start + b])
    return h.hexdigest()


def flip(path: Path, offset: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def float_offset(path: Path, name: str | None = None) -> int:
    """File offset of the most significant byte of the middle float32 of tensor ``name`` (default: the
    largest F32 tensor); XOR 0x40 there flips the top exponent bit."""
    header, start = read_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32"}
    name = name or max(tensors, key=lambda k: tensors[k]["data_offsets"][1] - tensors[k]["data_offsets"][0])
    a, b = tensors[name]["data_offsets"]
    index = (b - a) // 4 // 2
    return start + a + 4 * index + 3  # little endian: byte 3 holds the sign and 7 exponent bits


@pytest.fixture
def tiny_file(tmp_path) -> Path:
    torch.manual_seed(0)
    model = build_model("light-sr-x2", embed_dim=12, depths=(1,), d_state=4)
    return save_model(model, tmp_path / "m.safetensors")


def test_saved_files_carry_the_checksum_of_their_tensors(tiny_file):
    header, _ = read_header(tiny_file)
    assert header["__metadata__"]["tensors_sha256"] == oracle_checksum(tiny_file)


def test_flipped_exponent_bit_is_refused(tiny_file, tmp_path, capsys):
    good = load_model(tiny_file)
    flip(tiny_file, float_offset(tiny_file), 0x40)
    with pytest.raises(CheckpointError, match="damaged"):
        load_model(tiny_file)
    src = write_image(tmp_path / "a.png", np.full((4, 5, 3), 0.5, np.float32))
    code = main(["restore", str(src), "-o", str(tmp_path / "out"), "-m", str(tiny_file), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("qmambair restore: error: ") and "damaged" in err
    assert not (tmp_path / "out").exists()
    flip(tiny_file, float_offset(tiny_file), 0x40)  # flipped back: loads, same weights
    for (k, a), b in zip(good.state_dict().items(), load_model(tiny_file).state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_tampered_checksum_or_renamed_tensor_is_refused(tiny_file):
    raw = bytearray(tiny_file.read_bytes())
    header, _ = read_header(tiny_file)
    digest = header["__metadata__"]["tensors_sha256"].encode()
    pos = raw.index(digest)
    raw[pos] = ord("0") if raw[pos] != ord("0") else ord("1")
    tiny_file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        load_model(tiny_file)


def test_files_without_a_checksum_load_unchecked(tiny_file, tmp_path):
    """Official or foreign files have no checksum: read as they are (a flipped bit is not detectable)."""
    model = load_model(tiny_file)
    bare = tmp_path / "official.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    assert "__metadata__" not in read_header(bare)[0]
    loaded = load_model(bare)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))
    flip(bare, float_offset(bare), 0x01)  # lowest mantissa bit: loads, no check to fail
    load_model(bare)


@pytest.mark.parametrize("name", [n for n in list_shipped() if n.endswith("-fp")])
def test_shipped_float_models_are_protected(name, tmp_path):
    path = shipped_path(name)
    header, _ = read_header(path)
    assert header["__metadata__"]["tensors_sha256"] == oracle_checksum(path)
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    flip(copy, float_offset(copy), 0x40)
    with pytest.raises(CheckpointError, match="damaged"):
        load_model(copy)


# ------------------------------------------------------------------------------------ training checkpoints


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = build_model("light-sr-x2", embed_dim=12, depths=(1,), d_state=4)
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    opt.step()  # optimizer state to store
    return atomic_save(training_checkpoint(model, {"preset": "light-sr-x2"}, 7, opt), tmp_path / "last.pt")


def largest_member_offset(path: Path) -> int:
    """File offset of the middle of the largest tensor storage (``.../data/N``, stored uncompressed) of a
    torch zip file."""
    with zipfile.ZipFile(path) as z:
        storages = [i for i in z.infolist() if i.filename.rsplit("/", 2)[-2:-1] == ["data"]]
        info = max(storages, key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def test_checkpoint_with_a_flipped_byte_is_refused(checkpoint):
    assert load_checkpoint(checkpoint)["step"] == 7
    flip(checkpoint, largest_member_offset(checkpoint), 0x10)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="damaged"):
        load_model(checkpoint)


def test_checkpoint_with_a_changed_value_is_refused(checkpoint):
    obj = torch.load(checkpoint, weights_only=True)
    obj["step"] = 8
    torch.save(obj, checkpoint)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(checkpoint)


def test_old_checkpoint_without_checksum_loads(checkpoint):
    """Checkpoints written before the checksum existed (runs in progress) must stay resumable."""
    obj = torch.load(checkpoint, weights_only=True)
    del obj["checksum"]
    torch.save(obj, checkpoint)
    loaded = load_checkpoint(checkpoint)
    assert loaded["step"] == 7 and "checksum" not in loaded
    load_model(checkpoint)


def test_resume_refuses_a_damaged_last_pt_and_accepts_an_old_one(tmp_path):
    from qmambair.train.config import TrainConfig
    from qmambair.train.trainer import Trainer, train

    from .test_datasets import make_folder

    data = make_folder(tmp_path / "images", n=2, size=24)
    run = tmp_path / "run"
    cfg = TrainConfig(preset="light-sr-x2", model={"embed_dim": 8, "depths": [1], "d_state": 2},
                      data=str(data), val_data="none", iters=2, batch=1, patch=8, save_every=1, out=str(run),
                      lr_cache="", scan="cpu")
    train(cfg, progress=False)
    last = run / "last.pt"
    obj = torch.load(last, weights_only=True)
    assert "checksum" in obj
    del obj["checksum"]  # as the code before the checksum wrote it
    obj["step"] = 1  # (one step left to run)
    torch.save(obj, last)
    train(cfg, resume=True, progress=False)
    resumed = load_checkpoint(last)
    assert resumed["step"] == 2 and "checksum" in resumed  # continued, and written with a checksum
    flip(last, largest_member_offset(last), 0x01)
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match="damaged"):
        Trainer(cfg, resume=True, progress=False)
    assert last.read_bytes() == before


# ------------------------------------------------------------------------------------- stale temporaries


def test_killed_write_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    code = (
        "import os, sys\n"
        "from qmambair.fileio import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, timeout=60)
    assert proc.returncode == -9
    stale = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert len(stale) == 1 and stale[0].startswith(".last.pt.") and stale[0].endswith(".tmp")
    assert target.read_bytes() == b"old"
    (tmp_path / ".other.pt.abcdefgh.tmp").write_bytes(b"another file's")  # not a temporary of last.pt
    atomic_save({"x": 1}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abcdefgh.tmp", "last.pt"]


def test_temporary_of_a_live_writer_is_kept(tmp_path):
    target = tmp_path / "model.safetensors"
    live = tmp_path / ".model.safetensors.live1234.tmp"
    live.write_bytes(b"being written")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a writer in another process holds it
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
        assert live.exists() and target.read_bytes() == b"new"
    finally:
        os.close(fd)
    with atomic_path(target) as tmp:  # the writer is gone: now it is stale
        tmp.write_bytes(b"newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_two_writers_of_one_file_keep_each_others_temporaries(tmp_path):
    target = tmp_path / "best.pt"
    with atomic_path(target) as outer:
        outer.write_bytes(b"outer")
        with atomic_path(target) as inner:  # its clean-up must not take the outer writer's file
            inner.write_bytes(b"inner")
        assert outer.exists()
    assert target.read_bytes() == b"outer"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]
