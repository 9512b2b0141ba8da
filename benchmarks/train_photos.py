"""Short full-precision training on the built-in photo pool, then Y-PSNR/SSIM on the whole test images.

    qmambair data fetch                                   # once: the photo pool (about 90 s)
    python benchmarks/train_photos.py                     # train with --config quick-cpu, then evaluate
    python benchmarks/train_photos.py --skip-train --out runs/photos-quick-x2   # evaluate an existing run

The training part is exactly ``qmambair train --config quick-cpu --out OUT`` (same library call). The test
images are the pool's test split, whole, run with MambaIR's test-time tiling (threshold 200 LR pixels);
metrics follow docs/evaluation.md §2 (Y channel, border crop = scale). Bicubic upsampling is the floor.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from qmambair.data.datasets import Degradation, EvalImages, load_samples
from qmambair.data.imresize import imresize
from qmambair.data.photos import photo_paths
from qmambair.eval.tiling import restore_tiled
from qmambair.loading import load_model
from qmambair.metrics import psnr, ssim
from qmambair.train import make_config, train


def evaluate_whole(model_path: Path, tile: int) -> list[tuple[str, float, float, float, float, float]]:
    """(name, bicubic PSNR, SSIM, model PSNR, SSIM, seconds) per test image."""
    model = load_model(model_path)
    scale = model.upscale
    deg = Degradation("bicubic", scale=scale)
    samples, _ = load_samples(photo_paths("test"), deg, model.in_chans)
    rows = []
    for name, lq, hr in EvalImages(samples, deg):
        started = time.perf_counter()
        with torch.no_grad():
            out = restore_tiled(model, lq[None], mode="mambair", tile=tile)[0].clamp(0, 1)
        seconds = time.perf_counter() - started
        bic = imresize(lq.double(), float(scale)).float().clamp(0, 1)
        rows.append((name, psnr(bic, hr, scale, True), ssim(bic, hr, scale, True),
                     psnr(out, hr, scale, True), ssim(out, hr, scale, True), seconds))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/photos-quick-x2", help="run folder (default: %(default)s)")
    p.add_argument("--config", default="quick-cpu", help="training config (default: %(default)s)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--skip-train", action="store_true", help="only evaluate OUT/model.safetensors")
    p.add_argument("--tile", type=int, default=200, help="MambaIR tiling threshold (default: %(default)s)")
    args = p.parse_args()
    os.environ.setdefault("QMAMBAIR_SCAN", "cpu")
    out = Path(args.out)
    if not args.skip_train:
        started = time.perf_counter()
        result = train(make_config(args.config, args.sets, out=str(out)))
        print(f"training: {result['step']} steps, {time.perf_counter() - started:.0f} s wall "
              f"(crops: {result['psnr']:.3f} dB vs bicubic {result['psnr_base']:.3f} dB)")
    rows = evaluate_whole(out / "model.safetensors", args.tile)
    print(f"\n{'test image':<34} {'bicubic PSNR/SSIM':>19} {'model PSNR/SSIM':>19} {'seconds':>8}")
    for name, bp, bs, mp, ms, sec in rows:
        print(f"{name:<34} {bp:9.3f} / {bs:.4f} {mp:9.3f} / {ms:.4f} {sec:8.1f}")
    n = len(rows)
    mean = [sum(r[i] for r in rows) / n for i in range(1, 5)]
    label = f"mean ({n} images)"
    print(f"{label:<34} {mean[0]:9.3f} / {mean[1]:.4f} {mean[2]:9.3f} / {mean[3]:.4f}")


if __name__ == "__main__":
    main()
