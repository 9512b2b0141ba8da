"""Full-precision MambaIR networks and their presets."""

from .blocks import CAB, ChannelAttention, DropPath
from .mambair import MambaIR, VSSBlock
from .presets import build_model, get_preset, list_presets
from .ss2d import SS2D, Projection, ScanOp

__all__ = [
    "CAB",
    "ChannelAttention",
    "DropPath",
    "MambaIR",
    "Projection",
    "SS2D",
    "ScanOp",
    "VSSBlock",
    "build_model",
    "get_preset",
    "list_presets",
]
