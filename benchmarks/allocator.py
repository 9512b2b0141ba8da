"""What ``qmambair.allocator.keep_freed_memory()`` saves, for inference (float, Q-MambaIR) and training.

Two comparisons:

1. In one process, interleaved: glibc's *initial* thresholds held fixed (128 KiB: every tensor above that
   is mapped afresh) against ``keep_freed_memory()``, switched with ``mallopt`` before each case.
2. glibc's own adaptive thresholds (what a process gets when nobody sets them) cannot be restored once set,
   so they are compared across processes: ``--rounds`` pairs of child processes, one with the default, one
   with ``keep_freed_memory()``, started alternately; each child times every case ``--repeats`` times.

Cases (light ×4 from the shipped float weights): inference of one ``--size`` LR image, float and Q-MambaIR
W2A2 (quantizers initialised on one batch); one training step of the float model (batch 4, LR 32, L1, Adam).

    python benchmarks/allocator.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def build_cases(size: int) -> dict[str, Callable[[], None]]:
    from qmambair import load_model
    from qmambair.quant import QuantConfig, quantize_model

    torch.manual_seed(0)
    image = torch.rand(1, 3, size, size)
    lr, hr = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 128, 128)
    fp = load_model("light-sr-x4-fp").eval()
    qm = quantize_model(load_model("light-sr-x4-fp"), QuantConfig(method="qmambair", bits=2)).train()
    with torch.no_grad():
        qm(lr)
    qm.eval()
    student = load_model("light-sr-x4-fp").train()
    opt = torch.optim.Adam(student.parameters(), lr=1e-6, fused=True)

    def infer(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(image)
        return run

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        (student(lr) - hr).abs().mean().backward()
        opt.step()

    return {"float inference": infer(fp), "Q-MambaIR W2A2 inference": infer(qm), "float training step": step}


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> None:
    """One process of comparison 2: print {case: median seconds} as JSON."""
    from qmambair.allocator import keep_freed_memory
    from qmambair.train.trainer import set_threads

    set_threads(args.threads)
    if args.child == "keep" and not keep_freed_memory():
        raise SystemExit("keep_freed_memory() did not apply (not glibc?)")
    cases = build_cases(args.size)
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    print(json.dumps({name: statistics.median(ts) for name, ts in times.items()}))


def in_process(args: argparse.Namespace) -> str:
    from qmambair.allocator import GLIBC_INITIAL, MMAP_THRESHOLD, TRIM_THRESHOLD, set_thresholds

    modes = {"initial": GLIBC_INITIAL, "keep": (MMAP_THRESHOLD, TRIM_THRESHOLD)}
    cases = build_cases(args.size)
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        for name, fn in cases.items():
            for mode, thresholds in modes.items():
                if not set_thresholds(*thresholds):
                    raise SystemExit("mallopt is not available (not glibc?)")
                t = timed(fn)
                if rep:
                    times.setdefault((name, mode), []).append(t)
    lines = ["| case | glibc initial thresholds, ms | keep_freed_memory, ms | ratio |",
             "|---|---:|---:|---:|"]
    for name in cases:
        a, b = (statistics.median(times[(name, m)]) for m in modes)
        lines.append(f"| {name} | {1000 * a:,.0f} | {1000 * b:,.0f} | {b / a:.2f} |")
    return "\n".join(lines)


def across_processes(args: argparse.Namespace) -> str:
    results: dict[str, list[dict[str, float]]] = {"default": [], "keep": []}
    for _ in range(args.rounds):
        for mode in results:
            cmd = [sys.executable, __file__, "--child", mode, "--threads", str(args.threads), "--size",
                   str(args.size), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    lines = ["| case | glibc default, ms | keep_freed_memory, ms | ratio |", "|---|---:|---:|---:|"]
    for name in results["default"][0]:
        a, b = (statistics.median(r[name] for r in results[m]) for m in ("default", "keep"))
        lines.append(f"| {name} | {1000 * a:,.0f} | {1000 * b:,.0f} | {b / a:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="LR image size of the inference cases")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="process pairs of comparison 2")
    p.add_argument("--child", choices=("default", "keep"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    header = (f"light ×4, {args.threads} thread(s), {args.size}×{args.size} LR image, "
              f"torch {torch.__version__}; medians of {args.repeats} repeats")
    print(f"{header}\n\n1. one process, interleaved\n")
    from qmambair.train.trainer import set_threads

    set_threads(args.threads)
    print(in_process(args))
    print(f"\n2. across processes ({args.rounds} pairs, started alternately; "
          "median of the children's medians)\n")
    print(across_processes(args))


if __name__ == "__main__":
    main()
