"""``qmambair benchmark``: all methods under one budget and seed (``qmambair.experiments.benchmark``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .options import nonnegative_int, positive_int

# flags that set the BenchmarkSpec field of the same name
_FIELDS = (
    "methods",
    "bits",
    "scale",
    "preset",
    "iters",
    "fp_iters",
    "fp_from",
    "data",
    "bench",
    "out",
    "seed",
    "batch",
    "patch",
    "threads",
    "device",
    "ablation_bits",
    "calib_patches",
    "tile",
    "test_images",
    "save_every",
    "only",
)


def _name_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in _name_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 4,3,2, got {text!r}") from None


def make_spec(args: argparse.Namespace) -> Any:
    """The :class:`BenchmarkSpec` of the parsed arguments (flags, then ``--set`` overrides)."""
    from ..experiments.benchmark import BenchmarkSpec
    from ..train.config import apply_sets

    data: dict[str, Any] = {k: getattr(args, k) for k in _FIELDS if getattr(args, k, None) is not None}
    if args.ablation:
        data["ablation"] = True
    return BenchmarkSpec.from_dict(apply_sets(data, args.sets))


def run_benchmark_command(args: argparse.Namespace) -> int:
    """Run the benchmark, print the report; returns the exit code."""
    from ..experiments.benchmark import run_benchmark
    from ..train.config import check_device
    from ..train.trainer import TrainingDiverged

    if args.device:
        check_device(args.device, "--device")
    spec = make_spec(args)

    def log(line: str) -> None:
        print(f"[benchmark] {line}", file=sys.stderr, flush=True)

    try:
        run_benchmark(spec, log=None if args.quiet else log, progress=not args.quiet)
    except TrainingDiverged as exc:
        print(f"qmambair benchmark: error: {exc}", file=sys.stderr)
        return 1
    out = Path(spec.out)
    if spec.only:
        print(f"trained {', '.join(spec.only)} in {out / 'runs'}; run the command again without --only to "
              "evaluate every run and write the report")
        return 0
    print((out / "results.md").read_text())
    print(
        f"wrote {out / 'results.csv'}, {out / 'results.md'}"
        + (f", {out / 'psnr_vs_bits.png'}" if (out / "psnr_vs_bits.png").exists() else "")
    )
    return 0


def add_benchmark_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``qmambair benchmark``."""
    p = sub.add_parser(
        "benchmark",
        help="compare every quantization method under one budget and seed",
        description="Train a float MambaIR, then quantize it with each method and bit-width (QAT for the "
        "same number of iterations, or PTQ calibration), evaluate every model on whole test images "
        "(Y-channel PSNR/SSIM, border = scale) and write OUT/results.csv, results.md and psnr_vs_bits.png. "
        "Runs live in OUT/runs/<name>: finished runs are skipped, interrupted ones resume, "
        "cached results are reused.",
    )
    p.add_argument(
        "--methods",
        type=_name_list,
        metavar="M1,M2",
        help="methods to compare (default: fp,qmambair,lsq,lsq+,pams,dorefa,quantsr,n2uq,minmax,"
        "percentile; the PTQ method 'dynamic' exists too)",
    )
    p.add_argument(
        "--bits",
        type=_int_list,
        metavar="B1,B2",
        help="bit-widths, weights = activations (default: 4,3,2; supported 2,3,4,8)",
    )
    p.add_argument("--scale", type=positive_int,
                   help="super-resolution factor (default 4; preset: light-sr-xSCALE)")
    p.add_argument("--preset", help="model preset (default: light-sr-x<scale>)")
    p.add_argument("--iters", type=positive_int, metavar="N",
                   help="iterations of each QAT run (default 1000)")
    p.add_argument("--fp-iters", type=positive_int, metavar="N",
                   help="iterations of the float run (default: --iters)")
    p.add_argument("--from", dest="fp_from", metavar="CKPT",
                   help="quantize this float model (any file load_model reads) instead of training one")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="training images (a folder; 10%% held out for test) or 'builtin' (the photo pool of "
        "`qmambair data fetch`, its test split for test; default)",
    )
    p.add_argument(
        "--bench",
        action="append",
        metavar="DIR",
        help="extra test folder: NAME/HR (+ LR_bicubic/X<s>), a folder of such, or plain HR "
        "images (repeatable)",
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="add Q-MambaIR's component ablation (Act_Quant+LSQ baseline, +DLS, +RFA)",
    )
    p.add_argument(
        "--ablation-bits",
        type=_int_list,
        metavar="B1,B2",
        help="bit-widths of the ablation (implies --ablation; default: --bits)",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/benchmark)")
    p.add_argument("--seed", type=nonnegative_int, help="random seed of every run (default 0)")
    p.add_argument("--batch", type=positive_int, help="batch size (default: the preset's)")
    p.add_argument("--patch", type=positive_int, help="HR patch size in pixels (default: the preset's)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads (default: library default)")
    p.add_argument("--device", help="torch device (default: auto = cuda if available, else cpu)")
    p.add_argument(
        "--calib", dest="calib_patches", type=positive_int, metavar="N",
        help="PTQ calibration patches (default 32)"
    )
    p.add_argument("--tile", type=positive_int, metavar="N",
                   help="MambaIR tiling threshold, LR pixels (default 200)")
    p.add_argument(
        "--test-images", type=positive_int, metavar="N",
        help="at most N images of the test split (default: all)"
    )
    p.add_argument("--save-every", type=positive_int, metavar="N",
                   help="write a resumable checkpoint every N steps of each run (default 500)")
    p.add_argument(
        "--only",
        type=_name_list,
        metavar="RUN1,RUN2",
        help="train or calibrate only these runs (folder names under OUT/runs, e.g. qmambair-w2a2), after "
        "the float run; to share the work between processes, then run once without --only for the report",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model keyword or an option, e.g. --set model.embed_dim=12 "
        "--set model.depths=[1] (repeatable)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run_benchmark_command)
