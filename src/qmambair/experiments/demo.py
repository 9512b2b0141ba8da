"""The main job, ``qmambair demo``: bicubic, float, Q-MambaIR and LSQ (W4A4, W2A2) on the built-in images.

For each scale with shipped models (``qmambair.models.shipped``) every built-in test image is
centre-cropped, degraded with MATLAB bicubic (8-bit LR, as in the benchmark protocol), restored by every model
and scored (Y-channel PSNR/SSIM, border = scale, docs/evaluation.md §2). Written to the output folder: the
restored images, side by side crops (LR, bicubic, each model, HR), PSNR-against-bits plots, ``results.csv``,
``report.md`` and ``report.html``. No data fetch is needed: the images come from scikit-image and PyWavelets.
"""

from __future__ import annotations

import html
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.builtin import builtin_images
from ..data.datasets import Degradation, EvalImages, Sample
from ..data.degrade import bicubic_lr
from ..data.io import write_image
from ..eval.metrics import psnr, ssim
from ..loading import load_model
from ..models.shipped import list_shipped, shipped_path
from ..train.machine import describe_machine
from ..train.validate import baseline_output, metric_settings
from .report import Column, html_table, markdown_table, plot_metric_vs_bits, write_csv
from .visual import side_by_side

__all__ = ["DEMO_IMAGES", "DemoModel", "demo_models", "run_demo"]

# colour photographs and grey pictures of scikit-image / PyWavelets (grey ones are replicated to RGB)
DEMO_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "camera", "aero", "ascent")


@dataclass(frozen=True)
class DemoModel:
    """One row of the comparison: a label, the method and bit width, and the shipped model's name."""

    label: str
    method: str
    bits: int | None  # None: float
    name: str | None  # shipped model; None: bicubic


def demo_models(scale: int) -> list[DemoModel]:
    """The rows for one scale, in table order."""
    base = f"light-sr-x{scale}"
    rows = [
        DemoModel("bicubic", "bicubic", None, None),
        DemoModel("MambaIR (float)", "float", None, f"{base}-fp"),
    ]
    for bits in (4, 2):
        rows.append(
            DemoModel(f"Q-MambaIR W{bits}A{bits}", "Q-MambaIR", bits, f"{base}-qmambair-w{bits}a{bits}")
        )
        rows.append(DemoModel(f"LSQ W{bits}A{bits}", "LSQ", bits, f"{base}-lsq-w{bits}a{bits}"))
    return rows


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    """CHW float tensor in [0, 1] -> HWC uint8 (rounded), as restored images are saved and scored."""
    return (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def _samples(names: Sequence[str], scale: int) -> list[Sample]:
    samples = []
    for name, img in builtin_images(names).items():
        hr = (img * 255.0).round().astype(np.uint8)
        hr = hr[: hr.shape[0] - hr.shape[0] % scale, : hr.shape[1] - hr.shape[1] % scale]
        lq = (bicubic_lr(hr, scale) * 255.0).round().astype(np.uint8)
        samples.append(Sample(name, hr, lq))
    return samples


def _crop_box(hr: np.ndarray, size: int) -> tuple[int, int, int]:
    """Top-left corner and side of the ``size`` x ``size`` window with the most detail (gradient energy)."""
    grey = hr.astype(np.float64).mean(axis=2)
    energy = np.abs(np.diff(grey, axis=0))[:, :-1] + np.abs(np.diff(grey, axis=1))[:-1, :]
    size = min(size, *energy.shape)
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = (
        integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    )
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y), int(x), size


def run_demo(
    out: str | os.PathLike,
    scales: Sequence[int] = (2, 4),
    images: Sequence[str] = DEMO_IMAGES,
    crop: int = 256,
    crops_for: int = 2,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Evaluate and restore; write the report into ``out``; return the table rows (one per scale x model).

    ``crop``: centre crop of the HR images in pixels (0: whole images). ``crops_for``: how many images get a
    side-by-side picture per scale. Missing shipped models are reported and skipped.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shipped = set(list_shipped())
    rows: list[dict[str, Any]] = []
    pictures: list[tuple[str, Path]] = []
    plots: list[Path] = []
    for scale in scales:
        degradation = Degradation("bicubic", scale=scale)
        crop_border, y_channel = metric_settings(degradation)
        data = EvalImages(_samples(images, scale), degradation, crop=crop)
        items = [data[i] for i in range(len(data))]
        outputs: dict[str, list[np.ndarray]] = {}
        for spec in demo_models(scale):
            if spec.name is not None and spec.name not in shipped:
                log(f"x{scale} {spec.label}: shipped model {spec.name} is not installed, skipped")
                continue
            model = load_model(spec.name) if spec.name else None
            if model is not None:
                with torch.no_grad():  # warm-up (kernel compilation, allocations) outside the timing
                    model(items[0][1][None, :, :16, :16])
            psnrs, ssims, seconds, restored = [], [], 0.0, []
            for name, lq, hr in items:
                started = time.perf_counter()
                with torch.no_grad():
                    sr = baseline_output(lq, degradation) if model is None else model(lq[None])[0]
                seconds += time.perf_counter() - started
                sr8, hr8 = _to_uint8(sr), _to_uint8(hr)
                restored.append(sr8)
                psnrs.append(psnr(sr8, hr8, crop_border, y_channel))
                ssims.append(ssim(sr8, hr8, crop_border, y_channel))
                write_image(out / "images" / f"x{scale}" / spec.label.replace(" ", "_") / f"{name}.png", sr8)
            outputs[spec.label] = restored
            path = shipped_path(spec.name) if spec.name else None
            row = {
                "scale": scale,
                "model": spec.label,
                "method": spec.method,
                "bits": spec.bits,
                "psnr": float(np.mean(psnrs)),
                "ssim": float(np.mean(ssims)),
                "file_bytes": path.stat().st_size if path else None,
                "file_mb": path.stat().st_size / 1e6 if path else None,
                "seconds_per_image": seconds / len(items) if model is not None else None,
                "images": len(items),
            }
            rows.append(row)
            log(f"x{scale} {spec.label:<18} PSNR {row['psnr']:.3f} dB  SSIM {row['ssim']:.4f}")
        for index, (name, lq, hr) in enumerate(items[:crops_for]):
            hr8 = _to_uint8(hr)
            y, x, size = _crop_box(hr8, 96)
            lq8 = _to_uint8(lq)
            lr_up = np.repeat(np.repeat(lq8, scale, axis=0), scale, axis=1)  # nearest: the LR pixels as seen
            panels = [("LR (nearest)", lr_up)] + [(label, imgs[index]) for label, imgs in outputs.items()]
            panels.append(("HR", hr8))
            panels = [(label, img[y : y + size, x : x + size]) for label, img in panels]
            path = side_by_side(panels, out / f"crops_x{scale}_{name}.png", zoom=2)
            pictures.append((f"×{scale}, {name}", path))
        plot_rows = [r for r in rows if r["scale"] == scale]
        floors = {r["model"]: r["psnr"] for r in plot_rows if r["bits"] is None}
        plot = plot_metric_vs_bits(
            [r for r in plot_rows if r["bits"] is not None],
            out / f"psnr_vs_bits_x{scale}.png",
            title=f"MambaIR-light ×{scale}, built-in images",
            floors=floors,
        )
        if plot is not None:
            plots.append(plot)
    write_csv(rows, out / "results.csv")
    context = {"images": list(images), "crop": crop, "machine": describe_machine()}
    (out / "report.md").write_text(_markdown(rows, pictures, plots, context))
    (out / "report.html").write_text(_html(rows, pictures, plots, context))
    return rows


COLUMNS = [
    Column("scale", "scale", "d"),
    Column("model", "model"),
    Column("psnr", "PSNR (dB)", ".3f"),
    Column("ssim", "SSIM", ".4f"),
    Column("file_mb", "file (MB)", ".2f"),
    Column("seconds_per_image", "s / image", ".2f"),
]


def _preamble(context: dict[str, Any]) -> str:
    crop = f"{context['crop']}×{context['crop']} centre crops" if context["crop"] else "whole images"
    return (
        f"Built-in test images ({', '.join(context['images'])}; {crop}), MATLAB-bicubic LR rounded to 8 "
        "bits; PSNR/SSIM on the Y channel with a border of `scale` pixels, outputs rounded to 8 bits. Models "
        "are the shipped ones (see their model cards in `qmambair/weights/`): trained on CPU with a small "
        "budget on the built-in photo pool, so the numbers are not comparable to published tables. Time per "
        f"image: {context['machine']}; quantized models run fake-quant in float."
    )


def _markdown(rows, pictures, plots, context) -> str:
    parts = ["# qmambair demo report", "", _preamble(context), "", markdown_table(rows, COLUMNS)]
    for plot in plots:
        parts += [f"![PSNR against bits]({plot.name})", ""]
    for title, path in pictures:
        parts += [f"**{title}** (LR, bicubic, each model, HR):", "", f"![{title}]({path.name})", ""]
    return "\n".join(parts)


def _html(rows, pictures, plots, context) -> str:
    body = [
        f"<h1>qmambair demo report</h1><p>{html.escape(_preamble(context))}</p>",
        html_table(rows, COLUMNS),
    ]
    body += [f'<p><img src="{html.escape(p.name)}" alt="PSNR against bits"></p>' for p in plots]
    for title, path in pictures:
        body.append(f'<h3>{html.escape(title)}</h3><p><img src="{html.escape(path.name)}" alt="{title}"></p>')
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:nth-child(2){text-align:left}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>qmambair demo</title><style>{style}"
        f"</style></head><body>{''.join(body)}<p><small>{html.escape(platform.platform())}</small></p>"
        "</body></html>\n"
    )
