"""``qmambair train`` (full precision) and ``qmambair qat`` (quantization-aware training from a float model).

Both run under ``torchrun --nproc_per_node N -m qmambair train ...`` too (gloo on CPU, nccl on GPU). Options
are defaults < ``--config FILE`` < flags < ``--set key=value`` (see ``qmambair.train.config``), all checked
before the run folder is touched. A run folder holding another run's files is refused: ``last.pt`` asks for
``--resume``; ``best.pt``, ``model.safetensors`` or ``log.jsonl`` without ``last.pt`` ask for ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .options import nonnegative_float, nonnegative_int, positive_float, positive_int

# files of a run (besides last.pt) that a new run in the same folder would replace
RUN_FILES = ("best.pt", "model.safetensors", "log.jsonl")

# flags that set the TrainConfig field of the same name
_FIELDS = ("data", "val_data", "iters", "batch", "patch", "lr", "out", "seed", "workers", "device",
           "val_every", "save_every", "grad_clip", "distill", "threads")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR",
                   help="training images: a folder (HR only, benchmark or DIV2K layout) or 'builtin' "
                   "(default: the photo pool of `qmambair data fetch`, train split)")
    p.add_argument("--val-data", metavar="DIR",
                   help="validation folder, or 'none' (default: the pool's test split / 10%% of --data)")
    p.add_argument("--iters", type=positive_int, metavar="N", help="optimiser steps (default 20000)")
    p.add_argument("--batch", type=positive_int, metavar="B",
                   help="batch summed over processes (default: preset)")
    p.add_argument("--patch", type=positive_int, metavar="P",
                   help="HR patch size in pixels (default: preset)")
    p.add_argument("--lr", type=positive_float, help="initial learning rate (default 2e-4)")
    p.add_argument("--grad-clip", type=nonnegative_float, metavar="NORM",
                   help="clip the gradient norm (default 0: off)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default: runs/<preset>-<fp|method-wXaY>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR from its last.pt, with its stored options")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a RUN_DIR that holds best.pt / model.safetensors / log.jsonl of "
                   "an earlier run (the new run replaces the first two when it writes them and appends to "
                   "the log); a RUN_DIR with last.pt needs --resume or another --out")
    p.add_argument("--config", metavar="FILE", help="YAML file of options (or a shipped example's name)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any option, e.g. --set model.embed_dim=30 --set val_every=200 (repeatable)")
    p.add_argument("--seed", type=nonnegative_int, help="random seed (default 0)")
    p.add_argument("--workers", type=nonnegative_int, metavar="N",
                   help="DataLoader worker processes (default 0)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for torch and the scan (default: library default; 1 is often fastest "
                   "on a small, busy machine)")
    p.add_argument("--device", help="torch device (default: auto = cuda:<local rank> if available, else cpu)")
    p.add_argument("--val-every", type=positive_int, metavar="N",
                   help="validate every N steps (default 1000)")
    p.add_argument("--save-every", type=positive_int, metavar="N",
                   help="write last.pt every N steps (default 500)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in _FIELDS if getattr(args, name, None) is not None}


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder that another run's files are in (module docstring), before anything is written."""
    from ..errors import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the run")
    if resume:
        if not (out / "last.pt").is_file():
            raise UserError(f"--resume: {out} holds no last.pt to continue (is --out right?)")
        return
    if (out / "last.pt").exists():
        raise UserError(f"--out {out} already holds a run (last.pt): pass --resume to continue it, or choose "
                        "another --out")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        raise UserError(f"--out {out} holds {', '.join(found)} of an earlier run; choose another --out, or "
                        "pass --overwrite to replace them")


def _run(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from ..train.config import RUNTIME_KEYS, make_config
    from ..train.distributed import DistInfo
    from ..train.trainer import train

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
    check_run_folder(Path(config.resolved().out), args.resume, args.overwrite)
    result = train(config, resume=args.resume, progress=not args.quiet)
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
        from ..errors import UsageError, UserError

        if not args.from_:
            raise UsageError("qat needs --from CKPT (the full-precision model to quantize)")
        from ..loading import load_model

        _check_preset_name(args.preset)
        float_model = load_model(args.from_)
        if getattr(float_model, "quant_config", None) is not None:
            raise UserError(f"{args.from_} is already quantized; QAT starts from a full-precision model")
        if float_model.preset is None and args.preset is None:
            raise UserError(f"{args.from_} matches no preset; pass --preset (degradation and defaults)")
        if args.preset is not None:
            flags["degradation"] = _preset_degradation_for(float_model, args.from_, args.preset)
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


def _check_preset_name(name: str | None) -> None:
    from ..models.presets import list_presets
    from ..train.config import ConfigError

    if name is not None and name not in list_presets():
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")


def _scale_and_channels(config: dict[str, Any]) -> tuple[int, int]:
    scale = int(config.get("upscale", 1)) if config.get("upsampler") else 1
    return scale, int(config.get("in_chans", 3))


def _preset_degradation_for(model: Any, source: str, preset: str) -> dict[str, Any]:
    """The degradation of ``preset`` when it fits the checkpoint's scale and channels (the trainer keeps the
    checkpoint's architecture and preset; this makes the requested degradation the one trained on)."""
    from ..models.presets import get_preset
    from ..train.config import ConfigError

    spec = get_preset(preset)
    have, want = _scale_and_channels(model.config), _scale_and_channels(spec["model"])
    if have != want:
        what = f"preset {model.preset}" if model.preset else "a custom architecture"
        raise ConfigError(
            f"--preset {preset} (x{want[0]}, {want[1]} channel(s)) does not fit {source}, which is {what} "
            f"(x{have[0]}, {have[1]} channel(s)); leave --preset out or pass a preset of the same scale"
        )
    return dict(spec.get("degradation", {}))


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
    p.add_argument("--bits", type=positive_int, default=4,
                   help="weight and activation bits: 2, 3, 4 or 8 (default: %(default)s)")
    p.add_argument("--w-bits", type=positive_int, help="weight bits (default: --bits)")
    p.add_argument("--a-bits", type=positive_int, help="activation bits (default: --bits)")
    p.add_argument("--distill", type=nonnegative_float, metavar="W",
                   help="add W x L1 to the float teacher's output (default 0: off)")
    p.add_argument("--preset", help="preset for the degradation and defaults (default: the checkpoint's)")
    _add_common(p)
    p.set_defaults(func=run_qat)
