"""``qmambair restore`` writes the right pixels: the PNG the CLI writes equals the tiny model run in the test.

Inputs are written and outputs read with Pillow (not the package's image IO); the oracle is ``model(lr)``
computed here, or ``qmambair.eval.tiling.restore`` for the tiled modes, clipped to [0, 1] and rounded to the
file's bit depth. One level of tolerance covers a float32 value that sits on a rounding boundary.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qmambair.cli import main
from qmambair.eval.tiling import restore
from qmambair.models import build_model
from qmambair.models.checkpoint import save_model
from qmambair.quant import QuantConfig, quantize_model
from qmambair.quant.pack import export_packed

TINY = dict(embed_dim=12, depths=(1,), d_state=4)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("light-sr-x2", **TINY).eval()


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory) -> str:
    return str(save_model(model, tmp_path_factory.mktemp("models") / "tiny_x2.safetensors"))


def photo(h: int = 9, w: int = 11, seed: int = 0) -> np.ndarray:
    """A smooth colour picture with some texture, uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.5 + 0.4 * np.sin(5 * xx + c) * np.cos(4 * yy - c) for c in range(3)], axis=2)
    img = img + 0.05 * rng.standard_normal(img.shape)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def run_model(model: torch.nn.Module, img: np.ndarray) -> np.ndarray:
    """model(lr) for a float (H, W, C) image in [0, 1]: the (sH, sW, C) output, not clipped."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))[None]
        return model(x)[0].numpy().transpose(1, 2, 0)


def quantize_to(out: np.ndarray, levels: int) -> np.ndarray:
    return np.round(np.clip(out.astype(np.float64), 0, 1) * levels)


def cli_restore(src, dst, model_file: str, *extra: str) -> np.ndarray:
    assert main(["restore", str(src), "-o", str(dst), "-m", model_file, "-q", *extra]) == 0
    return np.asarray(Image.open(dst)).astype(np.float64)


def assert_pixels(written: np.ndarray, expected: np.ndarray) -> None:
    assert written.shape == expected.shape
    diff = np.abs(written - expected)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())


def test_rgb_png_pixels_equal_model_output(tmp_path, model, model_file):
    lr = photo()
    Image.fromarray(lr).save(tmp_path / "in.png")
    written = cli_restore(tmp_path / "in.png", tmp_path / "out.png", model_file)
    expected = quantize_to(run_model(model, lr / 255.0), 255)
    assert written.shape == (18, 22, 3)
    assert_pixels(written, expected)
    # the output is the model's, not something close to it: bicubic-like upsampling would differ
    assert np.abs(written - np.kron(lr, np.ones((2, 2, 1)))).mean() > 1


@pytest.mark.parametrize("mode", ["mambair", "blend"])
def test_tiled_pixels_equal_restore(tmp_path, model, model_file, mode):
    lr = photo(13, 10, seed=1)
    Image.fromarray(lr).save(tmp_path / "in.png")
    tiling = ("--tile", "4", "--tile-mode", mode)
    written = cli_restore(tmp_path / "in.png", tmp_path / "out.png", model_file, *tiling)
    expected = quantize_to(restore(model, lr / 255.0, tile=4, mode=mode), 255)
    assert_pixels(written, expected)
    if mode == "mambair":  # tiling changes an SS2D model's output: the CLI really tiled
        untiled = quantize_to(run_model(model, lr / 255.0), 255)
        assert np.abs(untiled - written).max() > 1


def test_16_bit_grey_png_pixels(tmp_path, model, model_file):
    grey16 = photo(seed=2)[..., 0].astype(np.uint16) * 257 + np.arange(11, dtype=np.uint16)[None, :]
    Image.fromarray(grey16).save(tmp_path / "in16.png")  # Pillow: mode I;16, a 16-bit grey PNG
    written = cli_restore(tmp_path / "in16.png", tmp_path / "out16.png", model_file)
    rgb = run_model(model, np.repeat(grey16[..., None] / 65535.0, 3, axis=2))
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]  # BT.601
    expected = quantize_to(luma, 65535)
    diff = np.abs(written - expected)
    assert written.shape == (18, 22) and diff.max() <= 2, diff.max()
    assert np.abs(written - 257 * np.round(expected / 257)).max() > 2  # really 16 bits, not 8 scaled up


def test_grey_png_into_rgb_model_gives_the_luma_of_the_output(tmp_path, model, model_file):
    grey = photo(seed=3)[..., 1]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    written = cli_restore(tmp_path / "grey.png", tmp_path / "out.png", model_file)
    rgb = run_model(model, np.repeat(grey[..., None] / 255.0, 3, axis=2))
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]  # BT.601
    assert_pixels(written, quantize_to(luma, 255))


def test_packed_quantized_model_pixels(tmp_path):
    torch.manual_seed(1)
    qmodel = quantize_model(build_model("light-sr-x2", **TINY), QuantConfig(bits=4)).train()
    lr = photo(seed=4)
    with torch.no_grad():
        qmodel(torch.from_numpy(lr.transpose(2, 0, 1) / 255.0).float()[None])  # quantizers initialise
    qmodel.eval()
    qmb = export_packed(qmodel, tmp_path / "m.qmb")
    Image.fromarray(lr).save(tmp_path / "in.png")
    written = cli_restore(tmp_path / "in.png", tmp_path / "out.png", str(qmb))
    expected = quantize_to(run_model(qmodel, lr / 255.0), 255)  # oracle: the model before packing
    assert_pixels(written, expected)
