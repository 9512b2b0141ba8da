"""Side-by-side crops of several models on built-in images: does a model look sharper than bicubic?

For each image: the HR centre crop (``--crop`` px), the MATLAB-bicubic LR of that crop, and each model's
output (the LR is made from the crop, so PSNRs can differ slightly from ``qmambair test --crop``, whose LR
comes from the whole image); a ``--view``-px window at the centre of the crop is shown enlarged ``--zoom``
times, labelled with the model and its Y PSNR on the whole crop. One row per image, written as one PNG.

    python benchmarks/compare_crops.py --scale 4 --images astronaut,coffee,chelsea \\
        --model bicubic=bicubic --model shipped=light-sr-x4-fp \\
        --model step1000=campaign/x4-fp3/best-step1000.safetensors --out docs/campaign/x4-crops.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="LABEL=MODEL",
                   help="model file or shipped name, or 'bicubic' (repeatable, shown in this order)")
    p.add_argument("--images", default="astronaut,coffee,chelsea", help="built-in image names")
    p.add_argument("--scale", type=int, default=4, choices=(2, 3, 4))
    p.add_argument("--crop", type=int, default=192, help="HR centre crop that is restored and scored (px)")
    p.add_argument("--view", type=int, default=64, help="HR window shown, at the centre of the crop (px)")
    p.add_argument("--zoom", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"compare_crops: error: {args.out} exists; pass --overwrite to replace it")
    models = [spec.partition("=")[::2] for spec in args.model]
    if any(not label or not spec for label, spec in models):
        raise SystemExit("compare_crops: error: --model wants LABEL=MODEL")

    import torch

    from qmambair.data.builtin import builtin_images
    from qmambair.data.degrade import bicubic_lr
    from qmambair.eval.bicubic import BicubicUpsampler
    from qmambair.eval.metrics import psnr
    from qmambair.experiments.visual import side_by_side
    from qmambair.loading import load_model
    from qmambair.train.trainer import set_threads

    set_threads(args.threads)
    s = args.scale
    nets = {label: BicubicUpsampler(s) if spec == "bicubic" else load_model(spec).eval()
            for label, spec in models}
    panels = []
    for name, img in builtin_images(args.images.split(",")).items():
        h, w = img.shape[:2]
        c = min(args.crop, h, w) // s * s
        y, x = (h - c) // 2 // s * s, (w - c) // 2 // s * s
        hr = img[y : y + c, x : x + c]
        lr = bicubic_lr(hr, s)
        v0, v1 = (c - args.view) // 2, (c + args.view) // 2
        row = [(f"{name} HR", hr)]
        for label, net in nets.items():
            with torch.no_grad():
                out = net(torch.from_numpy(lr).permute(2, 0, 1)[None].float())[0].permute(1, 2, 0).numpy()
            out = np.clip(out, 0.0, 1.0)
            row.append((f"{label} {psnr(out, hr, s, True):.2f} dB", out))
        panels += [(label, (np.round(im[v0:v1, v0:v1] * 255)).astype(np.uint8)) for label, im in row]
    side_by_side(panels, args.out, zoom=args.zoom, columns=len(models) + 1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
