"""Train the shipped models on the built-in photo pool and write them, with model cards, into the package.

    qmambair data fetch                                    # once: the photo pool
    python benchmarks/train_shipped.py --scale 4           # float, then Q-MambaIR and LSQ at W4A4 and W2A2
    python benchmarks/train_shipped.py --scale 2 --fp-iters 1000 --qat-iters 250
    python benchmarks/train_shipped.py --scale 4 --ablation-bits 2   # also the component ablation at W2A2
    python benchmarks/train_shipped.py --scale 4 --fp-weights src/qmambair/weights/light-sr-x4-fp.safetensors
                                                           # QAT only, from the shipped float model

Every run lives in ``runs/shipped/light-x<s>-<fp|method-wbab>`` and resumes from its ``last.pt`` when the
script is started again (kill it at any moment). Finished runs are skipped. At the end of each run the model
is written to ``src/qmambair/weights/``: the float model as safetensors, quantized models as packed ``.qmb``
files, each with a Markdown model card (data, budget, machine, wall time, test PSNR/SSIM).

All QAT runs of one scale share one budget and seed (same iterations, batch, patch, learning rate), so
Q-MambaIR and LSQ are compared fairly. The test numbers are the trainer's validation on the pool's test split
(centre crops, Y channel, border = scale; see ``qmambair.train.validate``).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from model_card import (
    last_validation,
    photo_licences,
    read_log,
    render_card,
    run_config,
    run_times,
    test_text,
)
from qmambair.experiments.benchmark import ABLATION
from qmambair.loading import load_model
from qmambair.quant.pack import export_packed
from qmambair.train import make_config, train
from qmambair.train.machine import describe_machine

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "qmambair" / "weights"
QAT_RUNS = (("qmambair", 4), ("lsq", 4), ("qmambair", 2), ("lsq", 2))


def command_line() -> str:
    """This script's command line as run, with the commit it ran at (the model card's provenance)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"python benchmarks/train_shipped.py {shlex.join(sys.argv[1:])}` at commit `{commit}"


def write_card(name: str, weight_file: Path, runs: list[Path], cfg: dict[str, Any], extra: str = "") -> None:
    """Model card of the model trained by ``runs`` (stages, each starting from the previous one's weights)."""
    logs = [read_log(run / "log.jsonl") for run in runs]
    val = last_validation(logs[-1])
    times = [run_times(events) for events in logs]
    seconds, step = sum(t[0] for t in times), sum(t[1] for t in times)
    staged = ""
    if len(runs) > 1:
        staged = f" ({' + '.join(str(t[1]) for t in times)}: stages restarting the schedule)"
    quant = cfg.get("quant") or {}
    cpu = describe_machine(cfg.get("device")).split(",")[0]
    first = run_config(logs[0])
    init = Path(first["init"]) if first["init"] else None
    start = f"{init.parent.name}/{init.name}" if init else "random init"
    if first.get("interp_init"):
        start += ", set to start as bicubic-like upsampling (qmambair.models.init)"
    kind = f"{quant['method']} W{quant['bits']}A{quant['bits']} (QAT)" if quant else "full precision"
    rows = [
        ("file", f"`{weight_file.name}` ({weight_file.stat().st_size:,} bytes)"),
        ("data", f"built-in photo pool (`qmambair data fetch`), train split; HR patches {cfg['patch']} px, "
                 "flips/rotations"),
        ("training photos", photo_licences()),
        ("degradation", f"MATLAB bicubic ×{cfg['preset'].rsplit('x', 1)[-1]}"),
        ("budget", f"{step} iterations{staged}, batch {cfg['batch']}, Adam lr {cfg['lr']:g}, MultiStepLR at "
                   f"{'/'.join(f'{m:g}' for m in cfg['milestones'])} of the run, L1"),
        ("starts from", start),
        ("command", f"`{command_line()}`"),
        ("machine", f"{cpu}; {cfg['threads'] or 'default'} torch thread(s) per run (the x2 and x4 chains ran "
                    "side by side on 2 cores)"),
        ("wall time", f"{seconds / 60:.1f} min"),
        ("test PSNR / SSIM", test_text(val, cfg)),
    ]
    intro = f"MambaIR {cfg['preset']} ({kind}), trained by `benchmarks/train_shipped.py` in this repository."
    weight_file.with_suffix(".md").write_text(render_card(name, intro, rows, extra))


def sigma_run_name(scale: int, bits: int, sigma_init: float) -> str:
    return f"light-x{scale}-qmambair-sigma{sigma_init:g}-w{bits}a{bits}"


def ablation_table(runs: Path, scale: int, bits: int, sigma_init: float = 0.0) -> str:
    """Markdown table of the component ablation at ``bits`` (last validation of each run, LSQ too)."""
    tag = f"w{bits}a{bits}"
    rows = [(label, f"light-x{scale}-ablation-{key}-{tag}") for key, (label, _, _) in ABLATION.items()]
    rows.append(("Q-MambaIR (DLS + RFA)", f"light-x{scale}-qmambair-{tag}"))
    if sigma_init:
        rows.append(
            (f"Q-MambaIR, DLS step init {sigma_init:g}σ (paper: 3σ)", sigma_run_name(scale, bits, sigma_init))
        )
    rows.append(("LSQ (reference)", f"light-x{scale}-lsq-{tag}"))
    lines = [f"| ×{scale} W{bits}A{bits} | PSNR (dB) | SSIM | QAT wall time (min) |", "|---|---|---|---|"]
    for label, name in rows:
        events = read_log(runs / name / "log.jsonl")
        val = last_validation(events)
        lines.append(f"| {label} | {val['psnr']:.3f} | {val['ssim']:.4f} | {run_times(events)[0] / 60:.1f} |")
    base = last_validation(read_log(runs / rows[0][1] / "log.jsonl"))
    lines.append(f"| bicubic | {base['psnr_base']:.3f} | {base['ssim_base']:.4f} | |")
    return "\n".join(lines) + "\n"


def run(out: Path, **options: Any) -> dict[str, Any]:
    """Train (or resume, or skip when finished) one run; returns its stored config."""
    config = make_config(None, [], out=str(out), **options)
    finished = (out / "log.jsonl").exists() and run_times(read_log(out / "log.jsonl"))[1] >= config.iters
    if not finished:
        resume = (out / "last.pt").exists()
        print(
            f"== {out.name}: {'resuming' if resume else 'starting'} ({config.iters} iterations)", flush=True
        )
        train(config, resume=resume, progress=False)
    return torch.load(out / "last.pt", map_location="cpu", weights_only=False)["config"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, choices=(2, 3, 4), required=True)
    p.add_argument(
        "--fp-iters",
        default="2000",
        help="float training stages, e.g. 2000,2500: each stage starts from the previous one's "
        "weights with a fresh schedule (lets a finished model train longer)",
    )
    p.add_argument(
        "--fp-weights",
        default="",
        help="start QAT from this float model (e.g. the shipped one) instead of training one "
        "(its card is kept)",
    )
    p.add_argument("--qat-iters", type=int, default=500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--patch", type=int, default=0, help="HR patch (default: 16 x scale)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="runs/shipped")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--ablation-bits",
        default="",
        help="bit-widths (e.g. 2 or 4,2) at which to also run the component ablation (Act_Quant + "
        "LSQ weights, +DLS, +RFA) under the same budget; the table goes to RUNS/ablation-x<s>.md",
    )
    p.add_argument(
        "--ablation-sigma-init",
        type=float,
        default=0.0,
        help="also run Q-MambaIR with this DLS step init (quant.dls_sigma_init; the paper's is 3) in the "
        "ablation, e.g. 1.0 (not shipped)",
    )
    args = p.parse_args()
    patch = args.patch or 16 * args.scale
    preset = f"light-sr-x{args.scale}"
    common = dict(
        preset=preset,
        data="builtin",
        batch=args.batch,
        patch=patch,
        threads=args.threads,
        device=args.device,
        val_images=0,
        val_crop=256,
        scan="cpu" if args.device != "cuda" else "",
    )
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if args.fp_weights:
        fp_model = Path(args.fp_weights)
        if not fp_model.is_file():
            raise SystemExit(f"--fp-weights: no such file {fp_model}")
    else:
        fp_dirs: list[Path] = []
        for stage, iters in enumerate(int(n) for n in args.fp_iters.split(",")):
            fp_dir = Path(args.runs) / f"light-x{args.scale}-fp{'' if stage == 0 else stage + 1}"
            # stage 1 starts as bicubic-like upsampling (qmambair.models.init); later from the previous stage
            init = {"init": str(fp_dirs[-1] / "model.safetensors")} if fp_dirs else {"interp_init": True}
            cfg = run(fp_dir, iters=iters, val_every=max(iters // 4, 1), save_every=50, **init, **common)
            fp_dirs.append(fp_dir)
        fp_model = fp_dir / "model.safetensors"
        shutil.copyfile(fp_model, WEIGHTS / f"{preset}-fp.safetensors")
        write_card(f"{preset}-fp", WEIGHTS / f"{preset}-fp.safetensors", fp_dirs, cfg)
    fp_size = fp_model.stat().st_size
    qat = dict(iters=args.qat_iters, val_every=args.qat_iters, save_every=25, init=str(fp_model), **common)

    for method, bits in QAT_RUNS:
        qdir = Path(args.runs) / f"light-x{args.scale}-{method}-w{bits}a{bits}"
        cfg = run(qdir, quant={"method": method, "bits": bits}, **qat)
        qfile = WEIGHTS / f"{preset}-{method}-w{bits}a{bits}.qmb"
        export_packed(load_model(qdir / "last.pt").eval(), qfile)
        write_card(
            qfile.stem,
            qfile,
            [qdir],
            cfg,
            extra=f"Packed: {bits}-bit weight codes; {qfile.stat().st_size / fp_size:.3f}× the float32 file.",
        )
    tables = []
    for bits in (int(b) for b in args.ablation_bits.split(",") if b):
        for key, (_, use_dls, use_rfa) in ABLATION.items():
            quant = {"method": "qmambair", "bits": bits, "use_dls": use_dls, "use_rfa": use_rfa}
            run(Path(args.runs) / f"light-x{args.scale}-ablation-{key}-w{bits}a{bits}", quant=quant, **qat)
        if args.ablation_sigma_init:
            quant = {"method": "qmambair", "bits": bits, "dls_sigma_init": args.ablation_sigma_init}
            run(
                Path(args.runs) / sigma_run_name(args.scale, bits, args.ablation_sigma_init),
                quant=quant,
                **qat,
            )
        tables.append(ablation_table(Path(args.runs), args.scale, bits, args.ablation_sigma_init))
    if tables:
        table_file = Path(args.runs) / f"ablation-x{args.scale}.md"
        table_file.write_text(
            f"Component ablation, light ×{args.scale}, {args.qat_iters} QAT iterations each (batch "
            f"{args.batch}, patch {patch}); pool test split, 256-px centre crops, Y, border {args.scale}.\n\n"
            + "\n".join(tables)
        )
        print(table_file.read_text())
    print(f"all runs of x{args.scale} done ({(time.perf_counter() - started) / 60:.1f} min this session)")


if __name__ == "__main__":
    main()
