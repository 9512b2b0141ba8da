"""Full-model speed per scan backend: MambaIR light x4 forward and one training step on a 64x64 LR patch.

Each backend runs in its own subprocess with ``QMAMBAIR_SCAN=<backend>`` (the model calls the dispatcher),
torch and numba limited to ``--threads``. A training step is forward, L1 loss against a random HR target,
backward and an Adam step. Times are medians of ``--repeats`` runs after one untimed warm-up (forward, then
step); "peak MB" is the process's ru_maxrss rise over the baseline taken after building the model and
loading the kernels (it includes the warm-up runs, so it is the peak of forward and training step together).

``--large`` adds the inference case of the bounded-memory requirement: light x2 on a 512x512 input (L=262144
per scan), forward only, one run without warm-up, cpu and chunked backends (takes several minutes).

    python benchmarks/model.py [--threads 2] [--repeats 3] [--large]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(preset: str, size: int, repeats: int, threads: int, train: bool) -> dict:
    """In the subprocess: build the model, warm up, then time forward (and training steps)."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "src"))
    from qmambair import build_model
    from qmambair.scan import resolve_backend

    torch.manual_seed(0)
    model = build_model(preset)
    scale = model.config.get("upscale", 1)
    x = torch.rand(1, 3, size, size)
    res: dict = {"backend": resolve_backend(None, x)}
    t0 = time.perf_counter()
    with torch.no_grad():  # loads (or compiles) the scan kernels
        model.eval()(torch.rand(1, 3, 8, 8))
    res["first_call_s"] = time.perf_counter() - t0
    base = _maxrss_mb()

    def forward():
        model.eval()
        with torch.no_grad():
            model(x)

    target = torch.rand(1, 3, size * scale, size * scale)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.99))

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.l1_loss(model(x), target)
        loss.backward()
        opt.step()

    jobs = [("fwd", forward)] + ([("step", step)] if train else [])
    if train:  # the --large inference row is a single cold run
        for _, fn in jobs:
            fn()  # warm-up
    for name, fn in jobs:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        res[f"{name}_s"] = statistics.median(times)
    res["peak_mb"] = _maxrss_mb() - base
    return res


def _spawn(backend: str, args: list[str], threads: int) -> dict:
    n = str(threads)
    env = dict(os.environ, QMAMBAIR_SCAN=backend, OMP_NUM_THREADS=n, NUMBA_NUM_THREADS=n)
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-repeats", type=int, default=1, help="repeats for the slow reference backend")
    p.add_argument("--backends", default="ref,cpu,chunked")
    p.add_argument("--large", action="store_true", help="also light x2 forward on 512x512 (cpu, chunked)")
    p.add_argument("--worker", nargs=2, metavar=("PRESET", "SIZE"), help=argparse.SUPPRESS)
    p.add_argument("--no-train", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        res = worker(a.worker[0], int(a.worker[1]), a.repeats, a.threads, not a.no_train)
        print(json.dumps(res))
        return

    import torch

    print(f"# MambaIR per scan backend, torch {torch.__version__}, {a.threads} threads\n")
    rows = []
    for backend in a.backends.split(","):
        reps = a.ref_repeats if backend == "ref" else a.repeats
        args = ["--worker", "light-sr-x4", "64", "--repeats", str(reps), "--threads", str(a.threads)]
        rows.append(("light-sr-x4, 64x64 LR", backend, _spawn(backend, args, a.threads)))
        print(f"  measured {rows[-1]}", file=sys.stderr)
    if a.large:
        for backend in ("cpu", "chunked"):
            args = ["--worker", "light-sr-x2", "512", "--repeats", "1", "--threads", str(a.threads)]
            args.append("--no-train")
            rows.append(("light-sr-x2, 512x512, forward", backend, _spawn(backend, args, a.threads)))
            print(f"  measured {rows[-1]}", file=sys.stderr)

    ref = {case: r for case, b, r in rows if b == "ref"}
    print("| model, input | scan backend | forward s | training step s | fwd × ref | step × ref | peak MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for case, backend, r in rows:
        if "error" in r:
            print(f"| {case} | {backend} | error: {r['error']} | | | | |")
            continue
        base = ref.get(case, {})
        sf = f"{base['fwd_s'] / r['fwd_s']:.1f}×" if "fwd_s" in base else "–"
        ss = f"{base['step_s'] / r['step_s']:.1f}×" if "step_s" in base and "step_s" in r else "–"
        step = f"{r['step_s']:.3f}" if "step_s" in r else "–"
        print(f"| {case} | {backend} | {r['fwd_s']:.3f} | {step} | {sf} | {ss} | {r['peak_mb']:,.0f} |")


if __name__ == "__main__":
    main()
