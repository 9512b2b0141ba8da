"""ONNX export of float and quantized (fake-quant or packed) MambaIR models at a fixed tile size.

The graph is traced on a copy of the model in eval mode with the pure-PyTorch chunked scan (the fused CPU
kernel is numba, which no exporter can see through); the scan's chunk loop is unrolled, so the exported graph
takes exactly one input size: ``(batch, in_chans, tile_h, tile_w)``. Run larger images tile by tile
(``qmambair.eval.tiling``).

Quantized models are exported after pre-deployment weight quantization (``freeze_weight_quantizers``): each
weight becomes constant integer codes times its scale minus its offset (bit-identical to the fake-quant
weight), so the graph holds no RFA threshold search. Activation quantizers export as Div/Clip/Round/Mul/Sub
(the straight-through term x − stopgrad(x) is an exact zero in eval); DLS computes its statistics per call as
in PyTorch, from float32 partial sums added in float64 (within an ulp or two of PyTorch's float64 ones;
``quant.fused._exported_stats``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .allocator import fresh_pages_above

ONNX_OPSET = 18


EXPORT_CHUNK = 16384  # scan positions per unrolled chunk in the graph: one chunk for tiles up to 128x128


@contextlib.contextmanager
def export_scan(max_chunk: int = EXPORT_CHUNK, qdq_codes: bool = False) -> Iterator[None]:
    """Route SS2D's scan to the chunked backend with chunks of up to ``max_chunk`` positions, each run as a
    segmented chunk (``scan.segmented``: O(T) work in about 11·√T nodes) where its length allows.

    The default chunk (64) makes the unrolled graph grow with the sequence length (~100k nodes and minutes
    of export at 32x32); long chunks keep it small. A Δ quantized into at most ``CODE_LEVELS`` codes has its
    softplus looked up by code (``load_quant.DeltaCodes``). ``qdq_codes`` (the QDQ format): Δ's codes come
    from a QuantizeLinear node (``export_qdq.grid_index``) and u's fake quantization rounds in
    QuantizeLinear/DequantizeLinear (``export_qdq.fake_quant_qdq``). ``selective_scan`` has no chunk
    argument, so SS2D's module-level reference is swapped while the context is active.
    """
    from .export_qdq import fake_quant_qdq, grid_index
    from .models import ss2d
    from .scan.chunked import selective_scan_chunked
    from .scan.load_quant import CODE_LEVELS, LoadQuant, delta_codes, quantize_before_scan

    def per_tensor(q: LoadQuant) -> bool:  # one set of scalars for the batch: the QDQ grid applies
        return all(t.numel() == 1 for t in (q.step, q.offset, q.lo, q.hi))

    def scan(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
        u_quant=None, delta_quant=None, delta_levels=None,
    ):  # fmt: skip
        del delta_levels  # a speed hint of the fused CPU scan
        few_codes = delta_quant is not None and delta_quant.qp - delta_quant.qn + 1 <= CODE_LEVELS
        if few_codes and delta_softplus and delta_bias is not None:  # softplus on a table of Δ's codes
            grid = None
            if qdq_codes and per_tensor(delta_quant):
                grid = grid_index(delta, delta_quant.step, delta_quant.offset, delta_quant.qn, delta_quant.qp)
            delta = delta_codes(delta, delta_quant, delta_bias, grid).delta()
            delta_quant, delta_bias, delta_softplus = None, None, False
        if qdq_codes and u_quant is not None and per_tensor(u_quant):
            u, u_quant = fake_quant_qdq(u, *u_quant), None
        u, delta = quantize_before_scan(u, delta, u_quant, delta_quant)
        return selective_scan_chunked(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            delta_softplus,
            return_last_state,
            chunk=min(u.shape[-1], max_chunk),
            segmented=True,
        )

    old = ss2d.selective_scan
    ss2d.selective_scan = scan
    try:
        yield
    finally:
        ss2d.selective_scan = old


def _tile(tile: int | tuple[int, int]) -> tuple[int, int]:
    th, tw = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if th < 1 or tw < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    return int(th), int(tw)


def prepare_for_export(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` ready to trace: quantizers checked, weight quantizers frozen."""
    from .quant.base import iter_quantizers
    from .quant.pack import freeze_weight_quantizers

    model = copy.deepcopy(model).eval()
    lazy = [name for name, q in iter_quantizers(model) if not bool(q.initialized)]
    if lazy:
        raise ValueError(
            f"{len(lazy)} quantizers are not initialised (e.g. {lazy[0]}): run a training batch "
            "or calibrate() before exporting"
        )
    if getattr(model, "quant_config", None) is not None:
        freeze_weight_quantizers(model)
    return model


ONNX_FORMATS = ("qdq", "float")


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    tile: int | tuple[int, int] = (64, 64),
    batch: int = 1,
    opset: int = ONNX_OPSET,
    dynamo: bool = False,
    fmt: str = "qdq",
) -> Path:
    """Export ``model`` (float or quantized) to ONNX for inputs of shape (batch, C, tile_h, tile_w).

    Input name ``input``, output name ``output``. ``dynamo=True`` uses torch.export (slower to export, same
    graph content); the default is the TorchScript tracer. Quantized models are written as a QDQ graph
    (``fmt="qdq"``: int8 weight codes, QuantizeLinear/DequantizeLinear, ``qmambair.export_qdq``; tracer
    only) or as the fake-quant float graph (``fmt="float"``); float models ignore
    ``fmt``. Returns the path.
    """
    if fmt not in ONNX_FORMATS:
        raise ValueError(f"ONNX format must be one of {', '.join(ONNX_FORMATS)}, got {fmt!r}")
    th, tw = _tile(tile)
    prepared = prepare_for_export(model)
    qdq = fmt == "qdq" and getattr(prepared, "quant_config", None) is not None
    if qdq:
        if dynamo:
            raise ValueError("the QDQ ONNX format needs the TorchScript tracer (dynamo=False)")
        from .export_qdq import use_qdq

        use_qdq(prepared)
    in_chans = getattr(prepared, "in_chans", 3)
    example = torch.rand(batch, in_chans, th, tw, generator=torch.Generator().manual_seed(0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # fresh pages for the trace's many mid-sized tensors: the heap would fragment (qmambair/allocator.py)
    with fresh_pages_above(), export_scan(qdq_codes=qdq), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        kwargs = {
            "dynamo": dynamo,
            "input_names": ["input"],
            "output_names": ["output"],
            "opset_version": opset,
        }
        if dynamo:
            kwargs["verbose"] = False
        torch.onnx.export(prepared, (example,), str(path), **kwargs)
    return path


def onnx_session(
    path: str | os.PathLike,
    threads: int | None = None,
    optimized_path: str | os.PathLike | None = None,
    spinning: bool = True,
):
    """An onnxruntime CPU session for an exported model (``threads`` intra-op threads; all graph
    optimisations on). ``optimized_path`` also writes the graph as onnxruntime rewrote it (which fusions,
    e.g. ``MatMulIntegerToFloat``, it made). ``spinning=False``: idle worker threads sleep instead of
    spinning (onnxruntime's default spins them for a while after each run, taking CPU from whatever runs
    next, e.g. the other cases of a benchmark)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: str | os.PathLike, x: torch.Tensor | np.ndarray, threads: int | None = None) -> np.ndarray:
    """Run an exported model with onnxruntime (CPU) on one input tile."""
    session = onnx_session(path, threads)
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return session.run(None, {session.get_inputs()[0].name: array.astype(np.float32)})[0]


#: Parity thresholds of ``parity_failure`` (and ``qmambair export --check``). A float graph must match PyTorch
#: to float rounding: max |diff| <= FLOAT_MAX_REL x max |output| (measured: ~4e-7). In a fake-quant graph a
#: one-ulp difference can move a value across a rounding threshold and the changed code propagates (on the
#: shipped W2A2/W4A4 models at 64x64, ~1 % of the output range at worst), so the bar there is a PSNR of the
#: unclipped output, peak 1: at least QUANT_MIN_PSNR dB.
FLOAT_MAX_REL = 1e-4
QUANT_MIN_PSNR = 40.0


def psnr_against(reference: np.ndarray, other: np.ndarray, clip: bool = False) -> float:
    """PSNR (dB, peak 1) of ``other`` against ``reference``, unclipped unless ``clip``; inf if equal."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if clip:
        a, b = np.clip(a, 0, 1), np.clip(b, 0, 1)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def onnx_parity(model: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> dict[str, float]:
    """Compare the exported graph with the PyTorch model on ``x`` (raw outputs, not clipped).

    ``max_abs``, ``max_rel`` (= max_abs / max |PyTorch output|) and ``psnr`` (peak 1): against PyTorch running
    the same scan algorithm as the graph (``export_scan``), the graph's own parity. ``psnr_default_scan``:
    against the model as it normally runs (fused CPU scan). In a fake-quant model tiny float differences can
    move a value across a rounding threshold, and the changed code then propagates, so the second number is
    lower for low-bit models.
    """
    model = model.eval()
    with torch.no_grad():
        with export_scan():
            ref = model(x).numpy()
        default = model(x).numpy()
    out = run_onnx(path, x)
    if out.shape != ref.shape:
        raise ValueError(f"the ONNX graph gives shape {out.shape}, PyTorch {ref.shape}")
    max_abs = float(np.abs(ref.astype(np.float64) - out).max())
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / max(float(np.abs(ref).max()), 1e-30),
        "psnr": psnr_against(ref, out),
        "psnr_default_scan": psnr_against(default, out),
    }


def parity_failure(parity: dict[str, float], quantized: bool) -> str | None:
    """Why ``parity`` (from ``onnx_parity``) fails its threshold, or None when it passes.

    Float models: ``max_rel`` <= ``FLOAT_MAX_REL``; quantized (fake-quant) models: ``psnr`` >=
    ``QUANT_MIN_PSNR`` dB (see the constants).
    """
    if quantized:
        if not parity["psnr"] >= QUANT_MIN_PSNR:
            return f"PSNR {parity['psnr']:.1f} dB < {QUANT_MIN_PSNR:g} dB (quantized model)"
        return None
    if not parity["max_rel"] <= FLOAT_MAX_REL:
        return f"max |diff| {parity['max_rel']:.1e} x max |output| > {FLOAT_MAX_REL:g} (float model)"
    return None
