"""Selective scan: one entry point, several implementations (see the modules beside this one).

Backends: ``ref`` (the exact sequential loop, the oracle), ``cpu`` (fused numba kernel), ``chunked`` (pure
PyTorch, bounded memory, ONNX-exportable), ``gpu`` (mamba_ssm or Triton, CUDA only). The choice comes from the
``backend`` argument, else the environment variable ``QMAMBAIR_SCAN``, else automatically: CUDA tensors use
``gpu`` when it is available, else ``chunked``; CPU tensors use ``cpu`` when numba imports, else ``chunked``
(float64 CPU inputs use ``chunked`` too, since the fused kernel computes in float32).
"""

from __future__ import annotations

import functools
import os

import torch

from .chunked import selective_scan_chunked
from .load_quant import LoadQuant, quantize_before_scan
from .reference import expand_groups, selective_scan_ref

BACKENDS = ("ref", "cpu", "chunked", "gpu")
ENV_VAR = "QMAMBAIR_SCAN"


@functools.cache
def _cpu_module():
    """The fused CPU module if numba imports (imported on first use: numba takes a while to load)."""
    try:
        from . import cpu
    except Exception:  # noqa: BLE001 - a broken numba install must fall back, not break the package
        return None
    return cpu if cpu.AVAILABLE else None


def _gpu_available() -> bool:
    if not torch.cuda.is_available():
        return False
    from . import gpu

    return gpu.available()


def _backend_available(name: str) -> bool:
    if name == "cpu":
        return _cpu_module() is not None
    if name == "gpu":
        return _gpu_available()
    return True


def available_backends() -> list[str]:
    """The backends that can run on this machine, in the order of ``BACKENDS``."""
    return [name for name in BACKENDS if _backend_available(name)]


def resolve_backend(backend: str | None, u: torch.Tensor) -> str:
    """The backend for input ``u``: the argument, else $QMAMBAIR_SCAN, else automatic (module docstring)."""
    source = "backend argument"
    if backend is None and os.environ.get(ENV_VAR):
        backend, source = os.environ[ENV_VAR].strip().lower(), f"${ENV_VAR}"
    if backend is None or backend == "auto":
        if u.is_cuda:
            return "gpu" if _gpu_available() else "chunked"
        if u.dtype != torch.float64 and _cpu_module() is not None:
            return "cpu"
        return "chunked"
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown scan backend {backend!r} (from {source}); choose one of {', '.join(BACKENDS)}"
        )
    if not _backend_available(backend):
        hint = {"cpu": "install numba", "gpu": "needs CUDA plus mamba_ssm or triton"}[backend]
        raise RuntimeError(
            f"scan backend {backend!r} (from {source}) is not available here ({hint}); "
            f"available: {', '.join(available_backends())}"
        )
    if backend == "cpu" and u.is_cuda:
        raise ValueError("scan backend 'cpu' takes CPU tensors; use 'gpu' or 'chunked' for CUDA tensors")
    if backend == "gpu" and not u.is_cuda:
        raise ValueError("scan backend 'gpu' takes CUDA tensors; use 'cpu' or 'chunked' for CPU tensors")
    return backend


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str | None = None,
    u_quant: LoadQuant | None = None,
    delta_quant: LoadQuant | None = None,
    delta_levels: torch.Tensor | None = None,
):
    """Same signature and semantics as mamba_ssm's ``selective_scan_fn`` (B, C: (batch, groups, N, L)).

    ``backend``: 'ref', 'cpu', 'chunked', 'gpu', 'auto' or None (None: $QMAMBAIR_SCAN, else automatic).
    ``u_quant`` / ``delta_quant`` (inference only, see ``load_quant``): scan the fake-quantized u / delta; the
    'cpu' backend quantizes while it reads them, the others quantize first. ``delta_levels`` (batch or
    1, k ≤ 4): the values delta takes, a speed hint for the 'cpu' backend (same result), ignored by the
    others."""
    name = resolve_backend(backend, u)
    if name == "cpu":
        args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        return _cpu_module().selective_scan_cpu(
            *args, u_quant=u_quant, delta_quant=delta_quant, delta_levels=delta_levels
        )
    u, delta = quantize_before_scan(u, delta, u_quant, delta_quant)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "chunked":
        return selective_scan_chunked(*args)
    if name == "gpu":
        from .gpu import selective_scan_gpu

        return selective_scan_gpu(*args)
    return selective_scan_ref(*args)


__all__ = [
    "BACKENDS",
    "LoadQuant",
    "available_backends",
    "expand_groups",
    "resolve_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
]
