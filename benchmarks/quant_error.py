"""Where a quantized model loses signal: the SQNR of every quantizer, grouped by place, for several models.

    python benchmarks/quant_error.py runs/shipped/light-x4-qmambair-w2a2 runs/shipped/light-x4-lsq-w2a2

Each model (run folder, checkpoint or .qmb) restores one built-in test image (a centre crop); a hook on every
quantizer records SQNR = 10·log10(Σx² / Σ(x̂ − x)²) of its input, and for DLS whether its step sits on the
(M − m)/2^b cap (then w gets no gradient, docs/method.md §3.3). The table shows, per place (blocks,
groups merged), the median SQNR in dB and, for DLS, the share of calls on the cap. Higher SQNR = less
quantization noise.
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from qmambair.data.builtin import builtin_images
from qmambair.data.degrade import bicubic_lr
from qmambair.loading import load_model
from qmambair.quant.base import iter_quantizers
from qmambair.quant.dls import DLS
from qmambair.train.trainer import set_threads

BLOCK = re.compile(r"^layers\.\d+\.(residual_group\.blocks\.\d+\.)?")


def _sqnr(x: torch.Tensor, xq: torch.Tensor) -> float:
    noise = (xq - x).double().pow(2).sum().item()
    signal = x.double().pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def _model_file(path: Path) -> Path:
    return path / "last.pt" if path.is_dir() else path


def measure(model_path: Path, lr: torch.Tensor) -> dict[str, tuple[list[float], list[bool]]]:
    """place -> (SQNR of each call, cap-active flag of each DLS call)."""
    model = load_model(_model_file(model_path)).eval()
    found: dict[str, tuple[list[float], list[bool]]] = defaultdict(lambda: ([], []))
    hooks = []
    for name, q in iter_quantizers(model):
        place = BLOCK.sub("", name)

        def hook(module, inputs, output, place=place):  # noqa: ANN001, ANN202
            x = inputs[0].detach()
            sqnrs, capped = found[place]
            sqnrs.append(_sqnr(x, output.detach()))
            if isinstance(module, DLS):
                delta, _, lo, hi = module.step_and_offset(x if x.dim() else x.reshape(1))
                cap = ((hi - lo) / 2**module.bits).clamp_min(1e-12)
                capped.append(bool(torch.all(delta >= cap)))

        hooks.append(q.register_forward_hook(hook))
    with torch.no_grad():
        model(lr)
    for h in hooks:
        h.remove()
    return dict(found)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="run folders, checkpoints or .qmb files")
    p.add_argument("--image", default="astronaut", help="built-in image name")
    p.add_argument("--crop", type=int, default=256, help="HR centre crop (px)")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    set_threads(args.threads)
    hr = builtin_images([args.image])[args.image]
    h, w = hr.shape[:2]
    c = args.crop - args.crop % args.scale
    hr = hr[(h - c) // 2 : (h - c) // 2 + c, (w - c) // 2 : (w - c) // 2 + c]
    lr = torch.from_numpy(np.ascontiguousarray(bicubic_lr(hr, args.scale))).permute(2, 0, 1)[None].float()

    results = {str(m): measure(m, lr) for m in args.models}
    places = list(dict.fromkeys(pl for r in results.values() for pl in r))
    names = [Path(m).name or m for m in results]
    print(f"SQNR (dB, median over blocks) of each quantizer's input on {args.image} ({c} px, ×{args.scale})")
    print()
    print("| place | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for place in places:
        cells = []
        for r in results.values():
            if place not in r:
                cells.append("–")
                continue
            sqnrs, capped = r[place]
            cell = f"{statistics.median(sqnrs):.1f}"
            if capped:
                cell += f" (cap {100 * sum(capped) / len(capped):.0f}%)"
            cells.append(cell)
        print(f"| {place} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
