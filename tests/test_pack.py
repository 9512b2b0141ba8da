"""Packed .qmb files: dense bit packing, file sizes, bit-identical reload, damaged files, CLI export."""

from __future__ import annotations

import argparse
import struct

import numpy as np
import pytest
import torch

from qmambair.commands.export import add_export_parser, packed_info
from qmambair.loading import load_model
from qmambair.models import build_model
from qmambair.models.checkpoint import save_model
from qmambair.quant import QuantConfig, iter_quantizers, quantize_model
from qmambair.quant.pack import (
    HEADER_SIZE,
    PackedFileError,
    export_packed,
    load_packed,
    pack_codes,
    packed_nbytes,
    unpack_codes,
)

SMALL = dict(embed_dim=24, depths=[2, 2], d_state=4)  # light-sr-x4 architecture, fewer and narrower blocks


def quantized(preset: str, config: QuantConfig, seed: int = 0, perturb: bool = True, **overrides):
    """A quantized model whose quantizers were initialised by one train-mode batch, then moved off their
    init (offsets, RFA anchors) so that padding terms and learned thresholds matter; eval mode."""
    torch.manual_seed(seed)
    model = quantize_model(build_model(preset, **overrides), config).train()
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16))
        if perturb:
            gen = torch.Generator().manual_seed(seed)
            for _, q in iter_quantizers(model):
                for name in ("offset", "beta"):
                    if isinstance(getattr(q, name, None), torch.nn.Parameter):
                        getattr(q, name).add_(0.05 * torch.randn((), generator=gen))
                if hasattr(q, "anchors"):
                    q.anchors.add_(0.3 * torch.rand(q.anchors.shape, generator=gen) - 0.15)
    return model.eval()


# --- bit packing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 1, 5, 16])
@pytest.mark.parametrize("count", [0, 1, 7, 9, 1001, (1 << 20) + 5])
def test_pack_round_trip(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    codes = rng.integers(0, 1 << bits, count)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_nbytes(count, bits) == (count * bits + 7) // 8
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)
    np.testing.assert_array_equal(unpack_codes(packed.tobytes(), bits, count), codes)


def test_pack_layout_is_dense_lsb_first():
    # 2-bit codes 1, 2, 3 -> bits 10 01 11 (LSB first) -> one byte 0b00111001
    assert pack_codes(np.array([1, 2, 3]), 2).tolist() == [0b00111001]
    # 3-bit codes cross byte boundaries: 8 codes take exactly 3 bytes
    assert pack_codes(np.full(8, 7), 3).tolist() == [255, 255, 255]
    assert pack_codes(np.array([5]), 3).tolist() == [5]


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="integers in"):
        pack_codes(np.array([0, 4]), 2)
    with pytest.raises(ValueError, match="integers in"):
        pack_codes(np.array([-1]), 4)
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(np.zeros(3, np.uint8), 4, 7)


# --- file sizes on the full light x4 model ----------------------------------------------------------------


@pytest.mark.parametrize("bits, limit", [(4, 0.30), (2, 0.25)])
def test_light_x4_file_size(tmp_path, bits, limit):
    model = quantized("light-sr-x4", QuantConfig(bits=bits), perturb=False)
    float_file = save_model(build_model("light-sr-x4"), tmp_path / "float.safetensors")
    packed = export_packed(model, tmp_path / f"w{bits}.qmb")
    ratio = packed.stat().st_size / float_file.stat().st_size
    assert ratio <= limit, f"W{bits}A{bits} file is {ratio:.3f} x the float32 file"
    info = packed_info(packed)
    assert info["bits"] == [bits] and info["packed_tensors"] == 220
    assert info["float32_safetensors_bytes"] == float_file.stat().st_size
    assert info["compression_ratio"] == pytest.approx(ratio)


# --- bit-identical reload ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(bits=2),
        QuantConfig(bits=3),
        QuantConfig(bits=4),
        QuantConfig(bits=8),
        QuantConfig(method="lsq", bits=4),
        QuantConfig(method="lsq+", bits=3),  # per-channel weight steps
        QuantConfig(method="dorefa", bits=2),  # tanh map: needs the stored level table
    ],
    ids=lambda c: f"{c.method}-w{c.w_bits}",
)
def test_packed_model_reproduces_eval_output(tmp_path, config):
    model = quantized("light-sr-x4", config, **SMALL)
    path = export_packed(model, tmp_path / "m.qmb")
    loaded = load_model(path)  # the .qmb dispatch of load_model
    assert not loaded.training and loaded.quant_config == model.quant_config
    x = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, out = model(x), loaded(x)
    assert torch.equal(ref, out), f"max |diff| = {(ref - out).abs().max():.3g}"
    # the loaded model can be packed again, to the same codes
    again = export_packed(loaded, tmp_path / "again.qmb")
    with torch.no_grad():
        assert torch.equal(load_packed(again)(x), ref)


def test_export_needs_initialised_quantizers(tmp_path):
    model = quantize_model(build_model("light-sr-x4", **SMALL), QuantConfig(bits=4)).eval()
    with pytest.raises(ValueError, match="not initialised"):
        export_packed(model, tmp_path / "m.qmb")
    with pytest.raises(ValueError, match="quantized model"):
        export_packed(build_model("light-sr-x4", **SMALL), tmp_path / "f.qmb")


# --- damaged files -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("qmb") / "m.qmb"
    export_packed(quantized("light-sr-x4", QuantConfig(bits=4), **SMALL), path)
    return path.read_bytes()


@pytest.mark.parametrize("cut", [0.5, 0.999, HEADER_SIZE, 30, 3])
def test_truncated_file_refused(tmp_path, packed_bytes, cut):
    n = int(len(packed_bytes) * cut) if isinstance(cut, float) else cut
    path = tmp_path / "cut.qmb"
    path.write_bytes(packed_bytes[:n])
    with pytest.raises(PackedFileError, match="truncated"):
        load_packed(path)


def test_corrupted_file_refused(tmp_path, packed_bytes):
    data = bytearray(packed_bytes)
    data[len(data) // 2] ^= 0x10
    path = tmp_path / "bad.qmb"
    path.write_bytes(bytes(data))
    with pytest.raises(PackedFileError, match="checksum mismatch"):
        load_model(path)
    path.write_bytes(packed_bytes + b"\0")
    with pytest.raises(PackedFileError, match="unexpected bytes"):
        load_packed(path)


def test_wrong_magic_and_version_refused(tmp_path, packed_bytes):
    path = tmp_path / "x.qmb"
    path.write_bytes(b"PK\x03\x04" + packed_bytes[4:])
    with pytest.raises(PackedFileError, match="not a qmambair packed file"):
        load_packed(path)
    path.write_bytes(packed_bytes[:8] + struct.pack("<H", 99) + packed_bytes[10:])
    with pytest.raises(PackedFileError, match="version 99"):
        load_packed(path)
    assert issubclass(PackedFileError, ValueError)


# --- command line ------------------------------------------------------------------------------------------


def test_export_command(tmp_path, capsys):
    model = quantized("light-sr-x4", QuantConfig(bits=3), **SMALL)
    src = save_model(model, tmp_path / "qat.safetensors")
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers())
    args = parser.parse_args(["export", str(src), "-o", str(tmp_path / "m.qmb")])
    assert args.func(args) == 0
    assert "3-bit" in capsys.readouterr().out
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m.qmb")(x), load_model(src)(x))
    float_src = save_model(build_model("light-sr-x4", **SMALL), tmp_path / "fp.safetensors")
    args = parser.parse_args(["export", str(float_src), "-o", str(tmp_path / "f.qmb")])
    with pytest.raises(ValueError, match="float model"):
        args.func(args)
