"""MATLAB-compatible bicubic imresize: agreement with bicubic_pytorch, numpy/torch parity, dtypes, errors."""

import numpy as np
import pytest
import torch

from qmambair.data import imresize, modcrop

bicubic_pytorch = pytest.importorskip("bicubic_pytorch")

SHAPES = [(37, 29, 3), (24, 32, 3), (17, 23, 1), (30, 45, 2)]
SCALES = [1 / 2, 1 / 3, 1 / 4, 2]


def _reference(img_hwc: np.ndarray, scale: float) -> np.ndarray:
    """bicubic_pytorch (a MATLAB re-implementation, float32 inside) on an HWC float array."""
    x = torch.from_numpy(img_hwc).permute(2, 0, 1).float()
    return bicubic_pytorch.imresize(x, scale=scale).permute(1, 2, 0).double().numpy()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_matches_bicubic_pytorch(shape, scale):
    img = np.random.default_rng(sum(shape)).random(shape)
    ours = imresize(img, scale)
    ref = _reference(img, scale)
    assert ours.shape == ref.shape
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", SCALES)
def test_numpy_and_torch_paths_agree(scale):
    img = np.random.default_rng(1).random((2, 3, 19, 26))  # BCHW
    out_t = imresize(torch.from_numpy(img), scale)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float64
    for b in range(2):
        out_n = imresize(img[b].transpose(1, 2, 0), scale)  # HWC
        np.testing.assert_allclose(out_t[b].numpy(), out_n.transpose(2, 0, 1), atol=1e-12, rtol=0)
        out_chw = imresize(torch.from_numpy(img[b]), scale)
        np.testing.assert_allclose(out_chw.numpy(), out_t[b].numpy(), atol=1e-12, rtol=0)
    gray = img[0, 0]
    gray_t = imresize(torch.from_numpy(gray), scale)
    np.testing.assert_allclose(imresize(gray, scale), gray_t.numpy(), atol=1e-12)


def test_known_values_from_matlab():
    # bicubic_pytorch's documented MATLAB result for imresize(reshape(0:15, 4, 4)', [3 3]). Its printed 6.1505
    # is a typo: the input is 4*row + col, so the output is 4*f(row) + f(col) and [1,0] = 4*1.5 + 0.1501.
    x = np.arange(16, dtype=np.float64).reshape(4, 4)
    expected = np.array([[0.7506, 2.1004, 3.4503], [6.1501, 7.5000, 8.8499], [11.5497, 12.8996, 14.2494]])
    np.testing.assert_allclose(imresize(x, output_shape=(3, 3)), expected, atol=1e-4)


def test_constant_image_stays_constant_and_linear_ramp_is_reproduced():
    const = np.full((21, 14, 3), 0.37)
    for s in (1 / 4, 1 / 3, 0.5, 2, 3):
        np.testing.assert_allclose(imresize(const, s), 0.37, atol=1e-12)
    # Cubic convolution reproduces linear functions: away from the borders, output pixel i (0-based) of a
    # 1/4 shrink samples the ramp at (i + 0.5) * 4 - 0.5.
    ramp = np.tile(np.arange(64, dtype=np.float64), (8, 1))
    out = imresize(ramp, output_shape=(8, 16))
    centres = (np.arange(16) + 0.5) * 4 - 0.5
    np.testing.assert_allclose(out[:, 3:-3], np.tile(centres[3:-3], (8, 1)), atol=1e-9)


def test_symmetric_boundary():
    # Last output of a 2x upsample of [0 0 0 1] sits at u = 3.25 and takes taps 2..5 with cubic weights
    # (-0.0703125, 0.8671875, 0.2265625, -0.0234375). MATLAB mirrors with the edge repeated, so taps 4 and 5
    # read x[3] = 1 and x[2] = 0: 0.8671875 + 0.2265625 = 1.09375 (reflect-101 would give 0.8671875,
    # edge replication 1.0703125).
    x = np.array([[0.0, 0.0, 0.0, 1.0]])
    up = imresize(x, output_shape=(1, 8))
    assert up[0, -1] == pytest.approx(1.09375, abs=1e-12)
    assert up[0, 0] == pytest.approx(0.0, abs=1e-12)


def test_dtypes():
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (20, 22, 3), dtype=np.uint8)
    res = imresize(u8, 0.5)
    assert res.dtype == np.float64  # unrounded by default
    assert not np.allclose(res, np.round(res))
    rounded = imresize(u8, 0.5, round_uint8=True)
    assert rounded.dtype == np.uint8
    np.testing.assert_array_equal(rounded, np.clip(np.round(res), 0, 255).astype(np.uint8))
    np.testing.assert_allclose(res, imresize(u8.astype(np.float64), 0.5))
    f32 = rng.random((20, 22, 3), dtype=np.float32)
    assert imresize(f32, 0.5).dtype == np.float32
    t32 = torch.from_numpy(f32).permute(2, 0, 1)
    assert imresize(t32, 2).dtype == torch.float32
    t8 = torch.from_numpy(u8).permute(2, 0, 1)
    assert imresize(t8, 0.5).dtype == torch.float64
    assert imresize(t8, 0.5, round_uint8=True).dtype == torch.uint8


def test_output_shape_and_per_axis_scale():
    img = np.random.default_rng(3).random((30, 40, 3))
    assert imresize(img, output_shape=(7, 53)).shape == (7, 53, 3)
    assert imresize(img, (0.5, 0.25)).shape == (15, 10, 3)
    assert imresize(img, 1 / 3).shape == (10, 14, 3)  # MATLAB: ceil(scale * size)
    np.testing.assert_allclose(imresize(img, 1.0), img, atol=1e-12)


def test_autograd_through_torch_path():
    x = torch.rand(1, 3, 12, 12, requires_grad=True)
    imresize(x, 0.5).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # every output row's weights sum to one, so d(sum)/dx sums to the number of output pixels per channel
    assert x.grad.sum().item() == pytest.approx(3 * 6 * 6, rel=1e-5)


def test_errors():
    img = np.zeros((8, 8, 3))
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img, 0.5, output_shape=(4, 4))
    with pytest.raises(ValueError, match="positive"):
        imresize(img, -2)
    with pytest.raises(ValueError, match="HW or HWC"):
        imresize(np.zeros((1, 8, 8, 3)), 0.5)
    with pytest.raises(ValueError, match="positive"):
        imresize(img, output_shape=(0, 4))


def test_modcrop():
    a = np.zeros((37, 29, 3))
    assert modcrop(a, 4).shape == (36, 28, 3)
    assert modcrop(a[..., 0], 3).shape == (36, 27)
    t = torch.zeros(2, 3, 37, 29)
    assert tuple(modcrop(t, 4).shape) == (2, 3, 36, 28)
    assert modcrop(a, 1).shape == a.shape
    with pytest.raises(ValueError):
        modcrop(a, 0)
