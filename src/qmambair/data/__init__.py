"""Images in and out: file io, MATLAB-compatible bicubic resizing, degradations and built-in test images."""

from .builtin import builtin_images, list_builtin
from .degrade import add_gaussian_noise, bicubic_lr, jpeg_compress
from .imresize import imresize, modcrop
from .io import (
    ImageInfo,
    ImageReadError,
    ProtectedPathError,
    image_info,
    read_image,
    rgb_to_gray,
    write_image,
)

__all__ = [
    "imresize",
    "modcrop",
    "read_image",
    "write_image",
    "image_info",
    "ImageInfo",
    "rgb_to_gray",
    "ImageReadError",
    "ProtectedPathError",
    "bicubic_lr",
    "add_gaussian_noise",
    "jpeg_compress",
    "builtin_images",
    "list_builtin",
]
