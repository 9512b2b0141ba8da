"""Cost of quantization: float vs Q-MambaIR vs LSQ training steps and inference, interleaved in one process.

Models (light ×N from the shipped float weights): the float model, and the same model quantized with
Q-MambaIR and with LSQ at ``--bits`` (quantizers initialised on one training batch), each with its own Adam.
Training step = forward, L1 loss, backward, Adam step on a batch of ``--batch`` LR patches of ``--lr-size``
pixels. Inference = no-grad eval forward of one ``--infer-size`` LR image, for the float model, the fresh
fake-quant models and the shipped packed ``.qmb`` models (``--packed``, W4A4 by default), these both with the
fused fake quantizers and in integer inference (int8 kernels, what ``qmambair restore`` runs for a ``.qmb``;
docs/method.md §6). Inference runs on
its own copy of each model, kept in eval mode: the training cases' ``train()`` and optimizer steps would
otherwise drop the quantized-weight cache before every inference call, which a deployed model keeps. Each
repeat runs every case once, in turn, on the same inputs; the table gives medians and the ratio to float.

``--quant-kernels eager,fused`` runs each quantized case with the eager quantizers (the oracle) and with the
fused kernels (``qmambair.quant.fused``), so the speed-up of the kernels is measured side by side too.
``--load-quant-ab`` adds, for each fresh quantized model, fused inference with u and Δ quantized before the
scan instead of by the scan as it reads them (docs/method.md §3.8), so that change is measured side by side.
``--levels-ab`` adds every quantized case once more with the scan computing every decay exp(δ·A) instead
of looking it up for Δ's at most 4 levels (docs/method.md §2.2), so the table is measured side by side.
``--denormals-ab`` adds every case once more with IEEE subnormal arithmetic in the fused scan (its kernels
flush subnormal numbers to zero otherwise, ``qmambair.scan.cpu``), so what that mode saves is measured side by
side.
``--pair`` starts two copies of the training comparison side by side, one thread each (the case of two
trainings sharing a 2-core machine), and prints both tables.
``--malloc keep`` (the default) reuses freed memory as the ``qmambair`` command does at start-up
(``qmambair.allocator.keep_freed_memory``); ``--malloc default`` keeps glibc's thresholds, under which every
large tensor may page-fault its memory in again (``benchmarks/allocator.py`` measures that alone).
``--runs K`` repeats the whole comparison in K fresh processes, one after the other, and prints for each case
the median over the runs of its ratio to float with the lowest and highest run: on a small shared machine
the ratio moves more between processes than between the repeats of one process.

    python benchmarks/quant_speed.py --threads 2 --repeats 5
    python benchmarks/quant_speed.py --threads 1 --pair
    python benchmarks/quant_speed.py --threads 2 --repeats 5 --runs 5     # the spread between processes
    python benchmarks/quant_speed.py --threads 2 --no-train --repeats 9 --load-quant-ab   # inference only
    python benchmarks/quant_speed.py --threads 1 --no-infer --packed "" --denormals-ab
    python benchmarks/quant_speed.py --profile qmambair     # top operators of one Q-MambaIR training step
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _median_ms(times: list[float]) -> float:
    return 1000.0 * statistics.median(times)


Cases = dict[str, Callable[[], None]]


def build_cases(args: argparse.Namespace) -> tuple[Cases, Cases]:
    """(training-step cases, inference cases): name -> a function that runs one of it."""
    from qmambair import load_model
    from qmambair.quant import QuantConfig, quantize_model
    from qmambair.quant.fused import quant_kernels
    from qmambair.quant.integer import enable_integer_inference

    torch.manual_seed(0)
    fp_name = f"light-sr-x{args.scale}-fp"
    lr = torch.rand(args.batch, 3, args.lr_size, args.lr_size)
    hr = torch.rand(args.batch, 3, args.lr_size * args.scale, args.lr_size * args.scale)
    image = torch.rand(1, 3, args.infer_size, args.infer_size)

    models: dict[str, torch.nn.Module] = {"float": load_model(fp_name).train()}
    for method in args.methods.split(","):
        if method == "fp":
            continue
        q = quantize_model(load_model(fp_name), QuantConfig(method=method, bits=args.bits)).train()
        with torch.no_grad():
            q(lr)  # first training batch initialises the quantizers
        models[method] = q

    kernels = args.quant_kernels.split(",")
    train_cases: Cases = {}
    infer_cases: Cases = {}
    for name, model in models.items():
        frozen = copy.deepcopy(model).eval()  # inference copy: the training steps leave its weight cache
        opt = torch.optim.Adam(model.parameters(), lr=1e-6, betas=(0.9, 0.99), fused=True)  # as the trainer
        for kernel in ["-"] if name == "float" else kernels:
            label = name if name == "float" else f"{name} ({kernel})"

            def step(model=model, opt=opt, kernel=kernel) -> None:
                with quant_kernels(kernel if kernel != "-" else None):
                    model.train()
                    opt.zero_grad(set_to_none=True)
                    loss = (model(lr) - hr).abs().mean()
                    loss.backward()
                    opt.step()

            def infer(model=frozen, kernel=kernel) -> None:
                with quant_kernels(kernel if kernel != "-" else None), torch.no_grad():
                    model(image)

            train_cases[label] = step
            infer_cases[label] = infer
            if args.load_quant_ab and kernel == "fused":
                def infer_before(infer=infer) -> None:
                    with quantize_before_scan():
                        infer()

                infer_cases[f"{name} (fused, u/Δ quantized before the scan)"] = infer_before
    if args.packed:
        for bits in args.packed.split(","):
            for method in ("qmambair", "lsq"):
                name = f"light-sr-x{args.scale}-{method}-w{bits}a{bits}"
                packed = load_model(name).eval()
                for kernel in kernels:
                    def infer_packed(model=packed, kernel=kernel) -> None:
                        with quant_kernels(kernel), torch.no_grad():
                            model(image)

                    infer_cases[f"{name}.qmb ({kernel})"] = infer_packed
                integer = load_model(name).eval()
                enable_integer_inference(integer, strict=True)

                def infer_int8(model=integer) -> None:
                    with torch.no_grad():
                        model(image)

                infer_cases[f"{name}.qmb (int8, restore's default)"] = infer_int8
    if args.levels_ab:
        train_cases, infer_cases = with_computed_decays(train_cases), with_computed_decays(infer_cases)
    if args.denormals_ab:
        train_cases, infer_cases = with_ieee_variants(train_cases), with_ieee_variants(infer_cases)
    return train_cases, infer_cases


def with_computed_decays(cases: Cases) -> Cases:
    """Each case, then (quantized cases) the same with the scan's decay table off (QScan passes no levels)."""
    from qmambair.quant.layers import QScan

    out: Cases = {}
    for name, fn in cases.items():
        out[name] = fn
        if name == "float":
            continue

        def computed(fn=fn) -> None:
            real = QScan._delta_levels
            QScan._delta_levels = lambda self, delta, grid: None
            try:
                fn()
            finally:
                QScan._delta_levels = real

        out[f"{name}, decays computed"] = computed
    return out


def with_ieee_variants(cases: Cases) -> Cases:
    """Each case, then the same case with IEEE subnormal arithmetic in the fused scan."""
    from qmambair.scan.cpu import ieee_denormals

    out: Cases = {}
    for name, fn in cases.items():
        def ieee(fn=fn) -> None:
            with ieee_denormals():
                fn()

        out[name] = fn
        out[f"{name}, IEEE subnormals in the scan"] = ieee
    return out


@contextlib.contextmanager
def quantize_before_scan() -> Iterator[None]:
    """Inside the block QScan does not hand u's and Δ's quantization to the scan (the path before the scan
    quantized them as it reads them): the baseline of ``--load-quant-ab``."""
    from qmambair.quant.layers import QScan

    real = QScan._load_quants
    QScan._load_quants = lambda self, u, delta: None
    try:
        yield
    finally:
        QScan._load_quants = real


def run_interleaved(cases: Cases, repeats: int) -> dict[str, list[float]]:
    for fn in cases.values():  # warm-up: kernels compiled / loaded, caches filled
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def table(title: str, times: dict[str, list[float]]) -> str:
    base = statistics.median(times["float"])
    lines = [f"| {title} | median ms | × float |", "|---|---:|---:|"]
    for name, ts in times.items():
        lines.append(f"| {name} | {_median_ms(ts):,.1f} | {statistics.median(ts) / base:.2f} |")
    return "\n".join(lines)


def runs_table(title: str, runs: list[dict[str, list[float]]]) -> str:
    """Each case's ratio to float over several runs (each: case -> its times): median, lowest, highest."""
    ratios: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    for run in runs:
        base = statistics.median(run["float"])
        for name, ts in run.items():
            ratios.setdefault(name, []).append(statistics.median(ts) / base)
            times.setdefault(name, []).append(statistics.median(ts))
    lines = [f"| {title} | median ms | × float, median of {len(runs)} runs | lowest run | highest run |",
             "|---|---:|---:|---:|---:|"]
    for name, rs in ratios.items():
        lines.append(f"| {name} | {_median_ms(times[name]):,.1f} | {statistics.median(rs):.2f} | "
                     f"{min(rs):.2f} | {max(rs):.2f} |")
    return "\n".join(lines)


def run_processes(argv: list[str], runs: int) -> None:
    """The comparison in ``runs`` fresh processes in turn; one table per kind with the spread over runs."""
    results: list[dict[str, dict[str, list[float]]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            out = Path(tmp) / f"run{i}.json"
            child = [sys.executable, __file__, *argv, "--runs", "1", "--json", str(out)]  # last ones win
            subprocess.run(child, check=True, stdout=subprocess.DEVNULL)
            results.append(json.loads(out.read_text()))
            print(f"run {i + 1} of {runs} done", file=sys.stderr)
    print(f"{runs} processes, one after the other; argv: {' '.join(argv)}\n")
    for kind in results[0]:
        print(runs_table(kind, [r[kind] for r in results]) + "\n")


def profile(args: argparse.Namespace, which: str) -> None:
    train_cases, _ = build_cases(args)
    label = next((k for k in train_cases if k.startswith(which)), None)
    if label is None:
        cases = ", ".join(train_cases)
        raise SystemExit(f"quant_speed: error: --profile {which!r} names no case (the cases: {cases})")
    train_cases[label]()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_cases[label]()
    print(f"profile of one training step: {label}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, default=4, choices=(2, 4))
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr-size", type=int, default=32, help="LR patch size of the training step")
    p.add_argument("--infer-size", type=int, default=64, help="LR image size of the inference case")
    p.add_argument("--methods", default="fp,qmambair,lsq")
    p.add_argument("--quant-kernels", default="fused", help="eager, fused or both (eager,fused)")
    p.add_argument("--packed", default="4", help="bit-widths of the shipped .qmb models to time ('' none)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-infer", action="store_true", help="time training steps only")
    p.add_argument("--no-train", action="store_true", help="time inference only")
    p.add_argument("--load-quant-ab", action="store_true",
                   help="also time fused inference with u and Δ quantized before the scan, not inside it")
    p.add_argument("--levels-ab", action="store_true",
                   help="also time every quantized case with the scan's decay table off")
    p.add_argument("--denormals-ab", action="store_true",
                   help="also time every case with IEEE subnormal arithmetic in the scan")
    p.add_argument("--pair", action="store_true", help="two copies side by side, one thread each")
    p.add_argument("--profile", default="", help="profile one training step of this case instead")
    p.add_argument("--runs", type=int, default=1, help="repeat the comparison in this many fresh processes")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: reuse freed memory as the command line does at start-up "
                        "(qmambair.allocator.keep_freed_memory); default: glibc's own thresholds")
    p.add_argument("--json", default="", help=argparse.SUPPRESS)  # a --runs child writes its times here
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.runs > 1:
        if args.pair or args.profile:
            p.error("--runs does not combine with --pair or --profile")
        run_processes(sys.argv[1:], args.runs)
        return

    if args.pair:
        cmd = [sys.executable, __file__, "--threads", "1", "--no-infer", "--packed", "",
               "--repeats", str(args.repeats), "--bits", str(args.bits), "--batch", str(args.batch),
               "--lr-size", str(args.lr_size), "--scale", str(args.scale), "--methods", args.methods,
               "--quant-kernels", args.quant_kernels, "--malloc", args.malloc]
        cmd += ["--denormals-ab"] if args.denormals_ab else []
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        for i, proc in enumerate(procs):
            out, _ = proc.communicate()
            print(f"== copy {i + 1} of 2 (side by side, 1 thread each)\n{out}")
        return

    from qmambair.allocator import keep_freed_memory
    from qmambair.train.trainer import set_threads

    if args.malloc == "keep":
        keep_freed_memory()
    set_threads(args.threads)
    if args.profile:
        profile(args, args.profile)
        return
    train_cases, infer_cases = build_cases(args)
    machine = f"{args.threads} thread(s), malloc {args.malloc}, torch {torch.__version__}"
    print(f"light ×{args.scale}, W{args.bits}A{args.bits}, batch {args.batch}, "
          f"LR {args.lr_size}×{args.lr_size}; {args.repeats} repeats, interleaved; {machine}\n")
    results: dict[str, dict[str, list[float]]] = {}
    if not args.no_train:
        results["training step"] = run_interleaved(train_cases, args.repeats)
        print(table("training step", results["training step"]))
    if not args.no_infer:
        print(f"\ninference: one {args.infer_size}×{args.infer_size} LR image, no grad, eval mode\n")
        results["inference"] = run_interleaved(infer_cases, args.repeats)
        print(table("inference", results["inference"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
