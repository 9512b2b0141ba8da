"""qmambair: MambaIR image restoration quantized to 2-4 bits (Q-MambaIR), fast on CPU."""

from .models.mambair import MambaIR
from .models.presets import build_model

__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Load any supported model file (official BasicSR .pth, qmambair .safetensors, packed .qmb); see
    ``qmambair.loading.load_model``."""
    from .loading import load_model as _load

    return _load(path, **kwargs)


__all__ = ["MambaIR", "build_model", "load_model", "__version__"]
