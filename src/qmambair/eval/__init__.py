"""Evaluation: tiled inference, complexity (MACs), metrics and benchmark tables."""

from .metrics import psnr, rgb_to_y, ssim

__all__ = ["psnr", "ssim", "rgb_to_y"]
