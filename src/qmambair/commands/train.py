"""``qmambair train`` (full precision) and ``qmambair qat`` (quantization-aware training from a float model).

Both run under ``torchrun --nproc_per_node N -m qmambair train ...`` too (gloo on CPU, nccl on GPU). Options
are defaults < ``--config FILE`` < flags < ``--set key=value`` (see ``qmambair.train.config``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

# flags that set the TrainConfig field of the same name
_FIELDS = ("data", "val_data", "iters", "batch", "patch", "lr", "out", "seed", "workers", "device",
           "val_every", "save_every", "grad_clip", "distill", "threads")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR",
                   help="training images: a folder (HR only, benchmark or DIV2K layout) or 'builtin' "
                   "(default: the photo pool of `qmambair data fetch`, train split)")
    p.add_argument("--val-data", metavar="DIR",
                   help="validation folder, or 'none' (default: the pool's test split / 10%% of --data)")
    p.add_argument("--iters", type=int, metavar="N", help="optimiser steps (default 20000)")
    p.add_argument("--batch", type=int, metavar="B", help="batch summed over processes (default: preset)")
    p.add_argument("--patch", type=int, metavar="P", help="HR patch size in pixels (default: preset)")
    p.add_argument("--lr", type=float, help="initial learning rate (default 2e-4)")
    p.add_argument("--grad-clip", type=float, metavar="NORM", help="clip the gradient norm (default: off)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default: runs/<preset>-<fp|method-wXaY>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR from its last.pt, with its stored options")
    p.add_argument("--config", metavar="FILE", help="YAML file of options (or a shipped example's name)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any option, e.g. --set model.embed_dim=30 --set val_every=200 (repeatable)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--workers", type=int, metavar="N", help="DataLoader worker processes (default 0)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch and the scan (default: library default; 1 is often fastest "
                   "on a small, busy machine)")
    p.add_argument("--device", help="torch device (default: auto = cuda:<local rank> if available, else cpu)")
    p.add_argument("--val-every", type=int, metavar="N", help="validate every N steps (default 1000)")
    p.add_argument("--save-every", type=int, metavar="N", help="write last.pt every N steps (default 500)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in _FIELDS if getattr(args, name, None) is not None}


def _run(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from ..data.photos import PhotosNotFetchedError
    from ..train.config import RUNTIME_KEYS, make_config
    from ..train.distributed import DistInfo
    from ..train.trainer import TrainingDiverged, train

    main = DistInfo(rank=int(os.environ.get("RANK", "0"))).is_main
    if args.resume:
        ignored = sorted(k for k in flags if k not in RUNTIME_KEYS) + (["--set"] if args.sets else [])
        if ignored and main:
            print(f"note: --resume continues with the run's stored options; ignoring {', '.join(ignored)}",
                  file=sys.stderr)
        flags = {k: v for k, v in flags.items() if k in RUNTIME_KEYS | {"preset", "quant"}}  # to find --out
        config = make_config(None, [], **flags)
    else:
        config = make_config(args.config, args.sets, **flags)
    try:
        result = train(config, resume=args.resume, progress=not args.quiet)
    except (TrainingDiverged, FileExistsError, PhotosNotFetchedError) as exc:
        print(f"qmambair {args.command}: error: {exc}", file=sys.stderr)
        return 1
    if main:
        line = f"done: {result['step']} steps in {result['seconds']:.0f} s"
        if result.get("psnr") is not None:
            line += (f"; validation PSNR {result['psnr']:.3f} dB / SSIM {result['ssim']:.4f} "
                     f"(baseline {result['psnr_base']:.3f} dB / {result['ssim_base']:.4f}); "
                     f"best {result['best_psnr']:.3f} dB at step {result['best_step']}")
        print(line)
    return 0


def run_train(args: argparse.Namespace) -> int:
    """``qmambair train``: full-precision training."""
    flags = _flags(args)
    if args.preset is not None:
        flags["preset"] = args.preset
    return _run(args, flags)


def run_qat(args: argparse.Namespace) -> int:
    """``qmambair qat``: quantization-aware training starting from a float checkpoint."""
    flags = _flags(args)
    if args.resume:
        flags["quant"] = {"method": args.method, "bits": args.bits}  # only to find the default --out
        if args.preset:
            flags["preset"] = args.preset
    else:
        if not args.from_:
            raise ValueError("qat needs --from CKPT (the full-precision model to quantize)")
        from ..loading import load_model

        float_model = load_model(args.from_)
        if getattr(float_model, "quant_config", None) is not None:
            raise ValueError(f"{args.from_} is already quantized; QAT starts from a full-precision model")
        if float_model.preset is None and args.preset is None:
            raise ValueError(f"{args.from_} matches no preset; pass --preset (degradation and defaults)")
        quant: dict[str, Any] = {"method": args.method, "bits": args.bits}
        if args.w_bits is not None:
            quant["w_bits"] = args.w_bits
        if args.a_bits is not None:
            quant["a_bits"] = args.a_bits
        from ..quant.convert import QuantConfig

        if QuantConfig(**quant).is_ptq:
            raise ValueError(f"{args.method} is a post-training method (calibration, no training); "
                             "qat takes qmambair, lsq, lsq+, pams, dorefa, quantsr or n2uq")
        flags.update(init=str(args.from_), quant=quant, preset=args.preset or float_model.preset)
    return _run(args, flags)


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``qmambair train``."""
    p = sub.add_parser(
        "train", help="train a full-precision MambaIR",
        description="Train a MambaIR network in full precision (L1, Adam 2e-4, MultiStepLR, flips/rotations; "
        "docs/method.md §5.1). Writes RUN_DIR/log.jsonl, last.pt, best.pt and model.safetensors. "
        "Multi-process: torchrun --nproc_per_node N -m qmambair train ...")
    p.add_argument("--preset", help="model preset, e.g. light-sr-x4 (default), denoise-color-s25")
    _add_common(p)
    p.set_defaults(func=run_train)


def add_qat_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``qmambair qat``."""
    p = sub.add_parser(
        "qat", help="quantization-aware training from a float checkpoint",
        description="Quantize a full-precision model (docs/method.md §4.1 places) and train it: quantizers "
        "initialise on the first batch (broadcast from rank 0 under torchrun). Data and schedule options are "
        "those of train.")
    p.add_argument("--from", dest="from_", metavar="CKPT",
                   help="full-precision model: official .pth, .safetensors, or a train run's last.pt/best.pt")
    p.add_argument("--method", default="qmambair",
                   help="qmambair (DLS+RFA), lsq, lsq+, pams, dorefa, quantsr, n2uq (default: %(default)s)")
    p.add_argument("--bits", type=int, default=4, help="weight and activation bits (default: %(default)s)")
    p.add_argument("--w-bits", type=int, help="weight bits (default: --bits)")
    p.add_argument("--a-bits", type=int, help="activation bits (default: --bits)")
    p.add_argument("--distill", type=float, metavar="W",
                   help="add W x L1 to the float teacher's output (default 0: off)")
    p.add_argument("--preset", help="preset for the degradation and defaults (default: the checkpoint's)")
    _add_common(p)
    p.set_defaults(func=run_qat)
