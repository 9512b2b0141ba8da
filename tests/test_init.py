"""Interpolation start: an untrained light-SR MambaIR equals bicubic-like upsampling, a restoration model
the identity; the body's residual branch starts at zero but still receives gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmambair.data.builtin import builtin_images
from qmambair.data.degrade import bicubic_lr
from qmambair.data.imresize import imresize
from qmambair.metrics import psnr
from qmambair.models import build_model
from qmambair.models.init import init_as_interpolation, phase_taps

TINY = dict(embed_dim=16, depths=[1], d_state=4)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_phase_taps_are_normalised_and_symmetric(scale):
    taps = phase_taps(scale)
    assert torch.allclose(taps.sum(1), torch.ones(scale, dtype=taps.dtype))
    assert torch.allclose(taps, taps.flip(0).flip(1))  # phase i mirrors phase s-1-i


@pytest.mark.parametrize("scale", [2, 4])
def test_untrained_sr_model_is_close_to_bicubic(scale):
    torch.manual_seed(0)
    model = init_as_interpolation(build_model(f"light-sr-x{scale}", **TINY)).eval()
    hr = builtin_images(["astronaut"])["astronaut"][:192, :192]
    lr = bicubic_lr(hr, scale)
    with torch.no_grad():
        out = model(torch.from_numpy(lr).permute(2, 0, 1)[None])[0].permute(1, 2, 0).clamp(0, 1).numpy()
    bicubic = np.clip(imresize(lr.astype(np.float64), scale), 0, 1)
    p_model, p_bicubic = psnr(out, hr, scale, True), psnr(bicubic, hr, scale, True)
    assert p_bicubic - 0.5 < p_model < p_bicubic + 0.5
    assert psnr(out, bicubic, scale, True) > 40  # the same interpolation, up to the truncated kernel


def test_restoration_model_starts_as_identity_and_learns():
    torch.manual_seed(0)
    model = init_as_interpolation(build_model("denoise-color", **TINY))
    x = torch.rand(1, 3, 16, 16)
    assert torch.allclose(model(x), x, atol=1e-6)
    model(x).sub(torch.rand(1, 3, 16, 16)).abs().mean().backward()
    assert model.conv_last.weight.grad.abs().sum() > 0


def test_sr_residual_branch_gets_gradients_at_once():
    torch.manual_seed(0)
    model = init_as_interpolation(build_model("light-sr-x2", **TINY))
    model(torch.rand(1, 3, 8, 8)).sub(torch.rand(1, 3, 16, 16)).abs().mean().backward()
    assert model.conv_after_body.weight.grad.abs().sum() > 0


def test_classic_head_is_refused():
    with pytest.raises(ValueError, match="upsampler"):
        init_as_interpolation(build_model("classic-sr-x2", embed_dim=12, depths=[1], d_state=4))
