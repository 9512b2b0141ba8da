"""``qmambair export``: a trained quantized model to a packed ``.qmb`` file and/or ONNX; ``packed_info``.

Register in ``qmambair.cli``: ``from .commands.export import add_export_parser`` and append it to
``COMMANDS``; ``qmambair info`` can add ``packed_info(path)`` for ``.qmb`` files.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any


def float_safetensors_size(config: dict[str, Any], preset: str | None = None) -> int:
    """Size in bytes of the float32 safetensors file (``save_model``) of a model with this config."""
    from ..models.checkpoint import save_model
    from ..models.presets import build_model

    model = build_model(None, **config)
    model.preset = preset
    with tempfile.TemporaryDirectory() as tmp:
        return save_model(model, Path(tmp) / "float.safetensors").stat().st_size


def packed_info(path: str | os.PathLike) -> dict[str, Any]:
    """What ``qmambair info`` shows for a ``.qmb`` file: bits, packed tensors, sizes, compression ratio.

    ``float32_safetensors_bytes`` is the size of the same architecture saved as float32 safetensors, and
    ``compression_ratio`` = file size / that size (smaller is better).
    """
    from ..quant.pack import packed_summary

    info = packed_summary(path)
    float_bytes = float_safetensors_size(info["config"], info.get("preset"))
    info["float32_safetensors_bytes"] = float_bytes
    info["compression_ratio"] = info["file_bytes"] / float_bytes
    return info


def format_packed_info(info: dict[str, Any]) -> str:
    """Human-readable lines of ``packed_info``."""
    bits = "/".join(str(b) for b in info["bits"])
    return "\n".join(
        [
            f"packed file:  format version {info['format_version']}, {bits}-bit weight codes",
            f"packed:       {info['packed_tensors']} tensors, {info['packed_weights']:,} weights in "
            f"{info['packed_bytes']:,} bytes; {info['raw_tensors']} float/quantizer tensors in "
            f"{info['raw_bytes']:,} bytes",
            f"file size:    {info['file_bytes']:,} bytes = {info['compression_ratio']:.3f} x the float32 "
            f"safetensors file ({info['float32_safetensors_bytes']:,} bytes)",
        ]
    )


def run_export(args: argparse.Namespace) -> int:
    """Load the model (QAT checkpoint, .safetensors, .qmb), write the requested files, print a summary."""
    from ..errors import UsageError
    from ..export_onnx import export_onnx, onnx_parity, parity_failure
    from ..fileio import atomic_path, check_output
    from ..loading import load_model
    from ..models.checkpoint import locate_model_file
    from ..quant.pack import export_packed

    if args.output is None and args.onnx is None:
        raise UsageError("nothing to write: give -o FILE.qmb and/or --onnx FILE.onnx")
    source = locate_model_file(args.model)  # None: a preset name (random weights)
    inputs = [source] if source is not None else []
    if args.output is not None:
        check_output(args.output, args.overwrite, inputs, "-o", (".qmb",))
    if args.onnx is not None:
        check_output(args.onnx, args.overwrite, inputs, "--onnx", (".onnx",))
    model = load_model(args.model).eval()
    if args.output is not None:
        if getattr(model, "quant_config", None) is None:
            raise ValueError(f"{args.model} is a float model; packing needs a quantized (QAT or PTQ) model")
        path = export_packed(model, args.output)
        print(f"wrote {path}")
        print(format_packed_info(packed_info(path)))
    if args.onnx is not None:
        with atomic_path(args.onnx) as tmp:  # an interrupted export leaves any earlier file as it was
            export_onnx(
                model, tmp, tile=args.tile, batch=args.batch, dynamo=args.dynamo, fmt=args.onnx_format
            )
        path = Path(args.onnx)
        quantized = getattr(model, "quant_config", None) is not None
        kind = ("QDQ graph, int8 weight codes" if args.onnx_format == "qdq" else "fake-quant float graph") \
            if quantized else "float graph"
        print(
            f"wrote {path} ({kind}; input {args.batch}x{getattr(model, 'in_chans', 3)}x{args.tile[0]}x"
            f"{args.tile[1]})"
        )
        if args.check:
            import torch

            x = torch.rand(
                args.batch,
                getattr(model, "in_chans", 3),
                *args.tile,
                generator=torch.Generator().manual_seed(0),
            )
            parity = onnx_parity(model, path, x)
            print(
                f"onnxruntime vs PyTorch: PSNR {parity['psnr']:.1f} dB, max |diff| {parity['max_abs']:.2e} "
                f"({parity['max_rel']:.1e} of max |output|)"
            )
            failure = parity_failure(parity, quantized)
            if failure:
                raise ValueError(f"ONNX parity check failed: {failure}; {path} may not compute the model")
            print("parity check passed")
    return 0


def _tile(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts] * (2 if len(parts) == 1 else 1)
    except ValueError:
        values = []
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"tile must look like N or HxW, got {text!r}")
    return values[0], values[1]


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """``qmambair export MODEL -o model.qmb [--onnx model.onnx --tile 64]``."""
    from .options import positive_int

    p = sub.add_parser(
        "export",
        help="pack a quantized model (.qmb) and/or export ONNX",
        description="Write a quantized model as a packed .qmb file (b-bit weight codes, checksummed; load it "
        "with load_model or 'qmambair restore -m FILE.qmb') and/or as ONNX for one fixed tile size (float or "
        "quantized models; run larger images tile by tile).",
    )
    p.add_argument("model", metavar="MODEL", help="QAT/PTQ checkpoint (.pth), .safetensors or .qmb")
    p.add_argument("-o", "--output", metavar="FILE.qmb", help="packed output file")
    p.add_argument("--onnx", metavar="FILE.onnx", help="also (or only) write an ONNX graph")
    p.add_argument(
        "--tile",
        type=_tile,
        default=(64, 64),
        metavar="N|HxW",
        help="ONNX input tile size in input pixels (default: 64)",
    )
    p.add_argument("--batch", type=positive_int, default=1, help="ONNX batch size (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (never the model file itself)")
    p.add_argument(
        "--onnx-format",
        choices=("qdq", "float"),
        default="qdq",
        help="quantized models: 'qdq' (default) stores the weight codes as int8 and quantizes activations "
        "with QuantizeLinear/DequantizeLinear (onnxruntime fuses some products into integer kernels); "
        "'float' writes the fake-quant float graph. Float models always get a float graph",
    )
    p.add_argument("--dynamo", action="store_true",
                   help="ONNX via torch.export instead of the tracer (not for QDQ graphs)")
    p.add_argument(
        "--check",
        action="store_true",
        help="run the ONNX graph with onnxruntime on a random tile and compare with PyTorch; exit 1 when "
        "max |diff| > 1e-4 x max |output| (float model) or PSNR < 40 dB (quantized model, where a float "
        "difference can flip a rounding)",
    )
    p.set_defaults(func=run_export)
