"""qmambair: MambaIR image restoration quantized to 2-4 bits (Q-MambaIR), fast on CPU."""

from .models import MambaIR, build_model

__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Load any supported model file (official BasicSR .pth, qmambair .safetensors, packed .qmb)."""
    from .models.checkpoint import load_model as _load

    return _load(path, **kwargs)


__all__ = ["MambaIR", "build_model", "load_model", "__version__"]
