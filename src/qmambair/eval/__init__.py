"""Measuring a model: metrics (PSNR/SSIM), tiled inference, complexity (MACs). Never trains."""

from .metrics import psnr, rgb_to_y, ssim

__all__ = ["psnr", "ssim", "rgb_to_y"]
