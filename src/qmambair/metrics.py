"""Public entry point for image-quality metrics: ``from qmambair.metrics import psnr, ssim``."""

from .eval.metrics import psnr, rgb_to_y, ssim

__all__ = ["psnr", "ssim", "rgb_to_y"]
