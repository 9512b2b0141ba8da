"""Degradations: MATLAB bicubic LR on the 8-bit grid, seeded Gaussian noise, JPEG compression."""

import numpy as np
import pytest
import torch

from qmambair.data import add_gaussian_noise, bicubic_lr, builtin_images, imresize, jpeg_compress, modcrop
from qmambair.metrics import psnr


@pytest.mark.parametrize("shape", [(37, 29, 3), (40, 41, 1), (24, 24, 3)])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_lr_shape_and_8bit_levels(shape, scale):
    hr = np.random.default_rng(0).random(shape).astype(np.float32)
    lr = bicubic_lr(hr, scale)
    assert lr.shape == (shape[0] // scale, shape[1] // scale, shape[2])
    assert lr.dtype == np.float32
    levels = lr.astype(np.float64) * 255
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert 0 <= lr.min() and lr.max() <= 1
    expected = np.clip(imresize(modcrop(hr, scale).astype(np.float64), 1 / scale), 0, 1)
    assert np.abs(lr - expected).max() <= 0.5 / 255 + 1e-6


def test_bicubic_lr_torch_and_uint8_agree_with_numpy():
    hr = np.random.default_rng(1).random((26, 35, 3))
    lr = bicubic_lr(hr, 3)
    t = bicubic_lr(torch.from_numpy(hr).permute(2, 0, 1)[None], 3)
    assert t.shape == (1, 3, 8, 11) and t.dtype == torch.float64
    np.testing.assert_allclose(t[0].permute(1, 2, 0).numpy(), lr, atol=1e-6)
    u8 = (hr * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(bicubic_lr(u8, 2), bicubic_lr(u8.astype(np.float64) / 255, 2))
    with pytest.raises(ValueError):
        bicubic_lr(hr, 1)


def test_bicubic_baseline_on_a_real_photo():
    hr = modcrop(builtin_images(["astronaut"])["astronaut"][:256, :256], 4)
    up = imresize(bicubic_lr(hr, 4), 4)
    value = psnr(up, hr, crop_border=4, y_channel=True)
    assert 22 < value < 32  # the bicubic floor on a natural photo


def test_noise_is_seeded_and_not_clipped():
    img = np.random.default_rng(2).random((64, 48, 3)).astype(np.float32)
    a = add_gaussian_noise(img, 25)
    b = add_gaussian_noise(img, 25)
    np.testing.assert_array_equal(a, b)  # seeded per call: the same image gets the same noise
    assert not np.array_equal(a, add_gaussian_noise(img, 25, seed=1))
    assert a.dtype == np.float32
    assert a.min() < 0 and a.max() > 1  # not clipped
    assert np.std(a - img) == pytest.approx(25 / 255, rel=0.05)
    # the legacy stream used by SwinIR/Restormer/MambaIR test scripts: np.random.seed(0); np.random.normal
    np.random.seed(0)
    ref = img + np.random.normal(0, 25 / 255, img.shape)
    np.testing.assert_allclose(a, ref.astype(np.float32), atol=1e-7)
    bgr = add_gaussian_noise(img, 25, bgr_order=True)
    np.testing.assert_allclose(bgr - img, (a - img)[..., ::-1], atol=1e-6)
    np.testing.assert_array_equal(add_gaussian_noise(img, 0), img)
    with pytest.raises(ValueError):
        add_gaussian_noise(img, -1)


def test_noise_on_uint8_and_grey():
    u8 = np.full((8, 8), 128, dtype=np.uint8)
    out = add_gaussian_noise(u8, 15)
    assert out.dtype == np.float32 and out.shape == (8, 8)
    assert abs(float(out.mean()) - 128 / 255) < 0.03


@pytest.mark.parametrize("shape", [(32, 40), (32, 40, 1), (32, 40, 3)])
def test_jpeg_changes_image_and_stays_in_range(shape):
    ramp = np.linspace(0, 1, 32 * 40).reshape(32, 40, 1)
    colour = np.clip(ramp + np.random.default_rng(3).normal(0, 0.1, (32, 40, 3)), 0, 1)
    img = colour[..., : shape[2]] if len(shape) == 3 else colour[..., 0]
    low = jpeg_compress(img, 10)
    high = jpeg_compress(img, 95)
    assert low.shape == img.shape and low.dtype == np.float32
    assert 0 <= low.min() and low.max() <= 1
    assert not np.allclose(low, img, atol=1 / 255)
    err_low, err_high = np.abs(low - img).mean(), np.abs(high - img).mean()
    assert err_high < err_low
    np.testing.assert_array_equal(jpeg_compress(img, 10), low)  # deterministic
    with pytest.raises(ValueError):
        jpeg_compress(img, 0)
