"""``qmambair test``: a model on benchmark folders (``qmambair.eval.testset``; docs/evaluation.md §5.4)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import add_tiling_options, nonnegative_float, nonnegative_int, positive_int


def check_options(args: argparse.Namespace) -> None:
    """Refuse bad option values before the model is loaded (``UsageError``, exit code 2)."""
    from ..errors import UsageError
    from ..train.config import check_device

    if args.model == "bicubic" and (args.scale is None or args.scale < 2):
        raise UsageError("-m bicubic needs --scale 2, 3 or 4 (the factor to upsample by)")
    if args.tile is not None and args.tile_mode == "mambair" and args.tile < 2:
        raise UsageError(f"--tile must be >= 2 in --tile-mode mambair, got {args.tile}")
    if args.sigma is not None and args.quality is not None:
        raise UsageError("give --sigma (denoising) or --quality (JPEG), not both")
    if args.quality is not None and args.quality > 100:
        raise UsageError(f"--quality must be in 1..100, got {args.quality}")
    check_device(args.device, "--device")


def run_test(args: argparse.Namespace) -> int:
    """Score the model on every folder, print the table per set, write the CSV; returns the exit code."""
    from tqdm import tqdm

    from ..eval.testset import (
        check_outputs,
        find_test_sets,
        format_table,
        model_degradation,
        nonfinite_count,
        score_test_set,
        write_scores_csv,
    )
    from ..train.trainer import set_threads
    from ..train.validate import metric_settings
    from .restore import _load

    check_options(args)
    if args.threads:
        set_threads(args.threads)
    if args.model == "bicubic":
        from ..eval.bicubic import BicubicUpsampler

        model = BicubicUpsampler(args.scale)
    else:
        model = _load(args.model, args.device)
    degradation = model_degradation(model, args.scale, args.sigma, args.quality)
    crop, y_channel = metric_settings(degradation)
    sets = [s for folder in args.folders for s in find_test_sets(folder, degradation.factor)]
    csv_path = args.csv or (str(Path(args.out) / "results.csv") if args.out else None)
    check_outputs(sets, args.out, csv_path, overwrite=args.overwrite)
    where = f"Y channel, border {crop}" if y_channel else f"all channels, border {crop}"
    extras = [f"centre crops of {args.crop} px"] if args.crop else []
    extras += [f"tile {args.tile} ({args.tile_mode})"] if args.tile else []
    extras += ["x8 self-ensemble"] if args.self_ensemble else []
    print(f"{args.model}: {degradation}; PSNR/SSIM on {where}" + "".join(f"; {e}" for e in extras))
    bar = tqdm(total=sum(len(s.pairs) for s in sets), unit="img", file=sys.stderr,
               disable=True if args.quiet else None)
    scores = []
    try:
        for s in sets:
            bar.set_description(s.name)
            scores += score_test_set(
                model, s, degradation, crop, y_channel, tile=args.tile, tile_mode=args.tile_mode,
                ensemble=args.self_ensemble, device=args.device, out_dir=args.out, overwrite=args.overwrite,
                progress=lambda _: bar.update(), centre_crop=args.crop,
            )
    finally:
        bar.close()
    print(format_table(scores, {s.name: s.lr_source for s in sets}))
    if unstable := nonfinite_count(scores):
        print(f"warning: the model's output has NaN or inf values on {unstable} of {len(scores)} images; "
              "they are scored nan (the model is unstable on inputs this size)", file=sys.stderr)
    if csv_path:
        write_scores_csv(csv_path, scores, overwrite=args.overwrite)
        print(f"wrote {csv_path}" + (f" and the restored images under {args.out}" if args.out else ""))
    return 0


def add_test_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``qmambair test``."""
    p = sub.add_parser(
        "test",
        help="score a model on benchmark folders (PSNR/SSIM per image and per set)",
        description="Restore every image of each benchmark folder with MODEL and score it as the papers do: "
        "super-resolution on the Y channel with a border of SCALE pixels, colour denoising on RGB and JPEG "
        "on grey without border. FOLDER is NAME/HR + NAME/LR_bicubic/X<s>, DIV2K_valid_HR + "
        "DIV2K_valid_LR_bicubic/X<s>, a folder holding several such sets, or a folder of HR images (LR made "
        "with MATLAB bicubic after modcrop); @builtin names the built-in images and @pool the test split "
        "of the photo pool (`qmambair data fetch`). Denoising and JPEG inputs get the model preset's noise "
        "(seed 0 per image) or JPEG quality. Prints mean PSNR/SSIM per set; --csv writes one row per image "
        "plus a mean row per set.",
    )
    p.add_argument("folders", nargs="+", metavar="FOLDER", help="benchmark folders, @builtin or @pool")
    p.add_argument("-m", "--model", required=True, metavar="MODEL",
                   help="model file (.pth/.safetensors/.qmb), shipped model name, 'bicubic' (the baseline; "
                   "needs --scale) or preset name (random weights: tests only)")
    p.add_argument("--scale", type=positive_int, default=None, metavar="S",
                   help="check that the model super-resolves xS (default: the model's scale)")
    p.add_argument("--sigma", type=nonnegative_float, default=None,
                   help="denoising: noise sigma on the 0-255 scale (default: the model's preset)")
    p.add_argument("--quality", type=positive_int, default=None,
                   help="JPEG: quality 1-100 (default: the model's preset)")
    p.add_argument("--crop", type=nonnegative_int, default=0, metavar="N",
                   help="score the centre N x N pixels of each target image, as training validation does "
                   "(default 0: whole images)")
    add_tiling_options(p)
    p.add_argument("--self-ensemble", action="store_true",
                   help="average the outputs of the 8 flips/rotations of each input (x8)")
    p.add_argument("--csv", metavar="FILE",
                   help="write the scores per image (default with --out: OUT/results.csv)")
    p.add_argument("--out", metavar="DIR", help="save the restored images as DIR/<set>/<image>.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CSV file or output image")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help="CPU threads")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_test)
