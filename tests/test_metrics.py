"""PSNR/SSIM with BasicSR conventions, checked against hand-computed values and independent computations."""

import math

import numpy as np
import pytest
import torch

from qmambair.metrics import psnr, rgb_to_y, ssim


def _rand_u8(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_psnr_known_mse():
    ref = np.full((4, 4, 3), 100, dtype=np.uint8)
    img = ref + 10  # MSE = 100
    assert psnr(img, ref) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)
    one = ref.copy()
    one[0, 0, 0] = 100 + 255 // 5  # a single error of 51 over 48 samples
    assert psnr(one, ref) == pytest.approx(10 * math.log10(255**2 * 48 / 51**2), abs=1e-12)


def test_psnr_identical_is_inf_and_symmetric():
    a = _rand_u8((9, 7, 3), 0)
    assert psnr(a, a) == math.inf
    b = _rand_u8((9, 7, 3), 1)
    assert psnr(a, b) == psnr(b, a)


def test_float_input_is_clamped_and_rounded_to_8_bits():
    ref = np.array([[[0, 128, 255]]], dtype=np.uint8)
    # 128.4/255 rounds to 128; out-of-range values clamp to 0 and 255
    img = np.array([[[-0.3, 128.4 / 255, 1.7]]], dtype=np.float32)
    assert psnr(img, ref) == math.inf
    img2 = np.array([[[0.0, 129.6 / 255, 1.0]]])  # rounds to 130: error 2 on one of 3 samples
    assert psnr(img2, ref) == pytest.approx(10 * math.log10(255**2 * 3 / 4), abs=1e-12)


def test_uint8_and_float_give_the_same_numbers():
    a, b = _rand_u8((32, 30, 3), 2), _rand_u8((32, 30, 3), 3)
    assert psnr(a, b) == psnr(a / 255.0, b.astype(np.float32) / 255)
    assert ssim(a, b) == ssim(a / 255.0, b / 255.0)


def test_rgb_to_y_known_colours():
    colours = np.array([[[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]], dtype=np.float64)
    y = rgb_to_y(colours)
    np.testing.assert_allclose(y[0], [235.0, 16.0, 16 + 65.481, 16 + 128.553, 16 + 24.966], atol=1e-12)
    np.testing.assert_allclose(rgb_to_y((colours * 255).astype(np.uint8)), y, atol=1e-12)
    assert y.dtype == np.float64  # not rounded
    with pytest.raises(ValueError):
        rgb_to_y(np.zeros((2, 2, 1)))


def test_psnr_y_channel():
    # Uniform images whose Y differs by 65.481 * 10/255 (a red step of 10 levels): PSNR = 20 log10(255 / dY)
    a = np.zeros((6, 6, 3), dtype=np.uint8)
    b = a.copy()
    b[..., 0] = 10
    d_y = 65.481 * 10 / 255
    assert psnr(a, b, y_channel=True) == pytest.approx(20 * math.log10(255 / d_y), abs=1e-10)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / (100 / 3)), abs=1e-10)
    # y_channel on a grey image is a no-op, as in BasicSR
    g1, g2 = _rand_u8((12, 12), 4), _rand_u8((12, 12), 5)
    assert psnr(g1, g2, y_channel=True) == psnr(g1, g2)


def test_crop_border():
    ref = _rand_u8((20, 20, 3), 6)
    img = ref.copy()
    img[:2] = 0
    img[:, -2:] = 255
    assert psnr(img, ref) < 40
    assert psnr(img, ref, crop_border=2) == math.inf
    assert psnr(img, ref, crop_border=1) < math.inf
    big_ref = _rand_u8((30, 30, 3), 7)
    big = big_ref.copy()
    big[:, :4] = 0
    assert ssim(big, big_ref) < 1.0
    assert ssim(big, big_ref, crop_border=4) == 1.0
    with pytest.raises(ValueError, match="crop_border"):
        psnr(img, ref, crop_border=10)


def test_shape_mismatch_and_bad_dtype():
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="shape"):
        ssim(np.zeros((16, 16, 3)), np.zeros((16, 16, 1)))
    with pytest.raises(TypeError):
        psnr(np.zeros((4, 4), dtype=np.uint16), np.zeros((4, 4), dtype=np.uint16))
    with pytest.raises(ValueError, match="11x11"):
        ssim(np.zeros((10, 20)), np.zeros((10, 20)))


def test_ssim_identical_is_one():
    a = _rand_u8((24, 26, 3), 8)
    assert ssim(a, a) == 1.0
    assert ssim(a, a, y_channel=True) == 1.0


def test_ssim_constant_images_closed_form():
    # Flat images: variances and covariance vanish, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    c1 = (0.01 * 255) ** 2
    a, b = 50.0, 80.0
    img = np.full((16, 16), 50, dtype=np.uint8)
    ref = np.full((16, 16), 80, dtype=np.uint8)
    assert ssim(img, ref) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12)


def _ssim_direct(a: np.ndarray, b: np.ndarray) -> float:
    """Straightforward SSIM: full 11x11 window at every valid position (no separable filtering)."""
    x = np.arange(11) - 5.0
    g = np.exp(-(x**2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for ch in range(a.shape[2]):
        pa = np.lib.stride_tricks.sliding_window_view(a[:, :, ch].astype(np.float64), (11, 11))
        pb = np.lib.stride_tricks.sliding_window_view(b[:, :, ch].astype(np.float64), (11, 11))
        mu_a = np.einsum("ijkl,kl->ij", pa, win)
        mu_b = np.einsum("ijkl,kl->ij", pb, win)
        var_a = np.einsum("ijkl,kl->ij", (pa - mu_a[..., None, None]) ** 2, win)
        var_b = np.einsum("ijkl,kl->ij", (pb - mu_b[..., None, None]) ** 2, win)
        cov = np.einsum("ijkl,kl->ij", (pa - mu_a[..., None, None]) * (pb - mu_b[..., None, None]), win)
        m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        out.append(m.mean())
    return float(np.mean(out))


def test_ssim_matches_direct_computation():
    ref = _rand_u8((27, 31, 3), 9)
    noise = np.random.default_rng(10).normal(0, 20, ref.shape)
    img = np.clip(ref + noise, 0, 255).astype(np.uint8)
    got = ssim(img, ref)
    assert 0 < got < 1
    assert got == pytest.approx(_ssim_direct(img, ref), abs=1e-10)
    assert ssim(ref, img) == pytest.approx(got, abs=1e-12)
    # cropping and Y conversion happen before the window, as in BasicSR
    yi = rgb_to_y(img[3:-3, 3:-3])[..., None]
    yr = rgb_to_y(ref[3:-3, 3:-3])[..., None]
    assert ssim(img, ref, crop_border=3, y_channel=True) == pytest.approx(_ssim_direct(yi, yr), abs=1e-10)


def test_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    ref = _rand_u8((40, 36, 3), 11)
    img = np.clip(ref + np.random.default_rng(12).normal(0, 12, ref.shape), 0, 255).astype(np.uint8)
    sk_psnr = metrics.peak_signal_noise_ratio(ref, img, data_range=255)
    # Gaussian window sigma 1.5 (truncated to 11x11), population covariances, border of 5 excluded
    options = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    sk_ssim = metrics.structural_similarity(ref, img, channel_axis=2, **options)
    assert psnr(img, ref) == pytest.approx(sk_psnr, abs=1e-9)
    assert ssim(img, ref) == pytest.approx(sk_ssim, abs=1e-9)


def test_torch_and_grey_inputs():
    a = np.random.default_rng(13).random((20, 18, 3))
    b = np.clip(a + 0.05, 0, 1)
    ta = torch.from_numpy(a).permute(2, 0, 1)
    tb = torch.from_numpy(b).permute(2, 0, 1)
    assert psnr(ta, tb) == psnr(a, b)
    assert ssim(ta[None], tb[None], crop_border=2) == ssim(a, b, crop_border=2)
    g = a[..., 0]
    assert psnr(g, b[..., 0]) == psnr(g[..., None], b[..., :1])
