"""``qmambair demo``: the main job (see ``qmambair.experiments.demo``)."""

from __future__ import annotations

import argparse
import time

from .options import nonnegative_int


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def run_demo_command(args: argparse.Namespace) -> int:
    from ..data.builtin import list_builtin
    from ..experiments.demo import run_demo
    from ..models.shipped import list_shipped
    from ..train.trainer import set_threads

    unknown = [n for n in args.images if n not in list_builtin()]
    if unknown:
        raise ValueError(f"unknown built-in image(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(list_builtin())}")
    if not list_shipped():
        raise FileNotFoundError("no shipped models are installed (qmambair/weights/ is empty)")
    if args.threads:
        set_threads(args.threads)
    started = time.perf_counter()
    rows = run_demo(args.out, scales=args.scales, images=args.images, crop=args.crop)
    if not rows:
        return 1
    print(f"report: {args.out}/report.html and {args.out}/report.md ({time.perf_counter() - started:.0f} s)")
    return 0


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``qmambair demo``."""
    from ..experiments.demo import DEMO_IMAGES

    p = sub.add_parser(
        "demo",
        help="compare bicubic, float, Q-MambaIR and LSQ on built-in images; write a report",
        description="Degrade built-in images (MATLAB bicubic), restore them with the shipped float, "
        "Q-MambaIR and LSQ models (W4A4, W2A2) at each scale, and write report.html / report.md (PSNR, SSIM, "
        "file size, time per image), side-by-side crops and PSNR-against-bits plots into OUT.",
    )
    p.add_argument("--out", default="demo-output", help="output folder (default: %(default)s)")
    p.add_argument("--scales", type=_ints, default=[2, 4], help="comma-separated scales (default: 2,4)")
    p.add_argument("--images", type=lambda t: [s for s in t.split(",") if s], default=list(DEMO_IMAGES),
                   help=f"comma-separated built-in images (default: {','.join(DEMO_IMAGES)})")
    p.add_argument("--crop", type=nonnegative_int, default=256,
                   help="HR centre crop in pixels, 0 = whole (default: 256)")
    p.add_argument("--threads", type=nonnegative_int, default=0,
                   help="CPU threads (default: torch's default)")
    p.set_defaults(func=run_demo_command)
