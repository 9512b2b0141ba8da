"""Selective-scan speed and memory per backend (ref, cpu, chunked), printed as one Markdown table.

Shapes: light SR (batch 1, K=4 x d_inner 72 -> D'=288, N=10, L=64x64) and classic SR (D'=1440, N=16, L=48x48);
with ``--large``, also the forward of light x2 on a 512x512 input (L=262144) for the bounded-memory backends.

Method: each (backend, shape) runs in a fresh subprocess, with torch and numba limited to ``--threads``. The
subprocess first runs the scan on a tiny problem (loads or compiles kernels), reads ``ru_maxrss`` as its
baseline, then runs one full-size forward under no_grad and one forward+backward, reading ``ru_maxrss`` after
each: the peak-memory columns are those high-water marks minus the baseline (inputs excluded, outputs and
gradients included; the forward+backward value includes the forward). Then it times ``--repeats`` runs of each
(after one untimed warm-up) and reports the medians. The numba compile time is measured separately in a
subprocess with an empty NUMBA_CACHE_DIR; "cache load" is the first call in a process with the cache filled.

    python benchmarks/scan.py [--threads 2] [--repeats 5] [--large]
    python benchmarks/scan.py --interleaved [--shape light] [--repeats 5]

``--interleaved`` is the speed comparison proper: one process, the backends run in turn (ref, cpu, chunked,
ref, cpu, ...) on the same inputs so that machine load hits them alike; it prints the medians and each
backend's speed-up over the reference loop (ratio of medians). Memory is not measured in this mode.
``--tile-ab`` adds ``cpu-tile64``: the fused kernel with forward tiles of 64 positions (one checkpoint chunk,
as before the forward read tiles of 256; docs/method.md §2.2), so the tile size is measured side by side.

    python benchmarks/scan.py --interleaved --tile-ab --shape light-128 --ref-repeats 1

``--state-sweep`` times the fused CPU forward (no grad) of ``--shape`` with N = 1, 2, 4, 10 and 16 states,
the other sizes fixed, and prints the time per (position, channel) and per state update: the part that does
not grow with N is the work done once per position and channel (reading u and Δ into the kernel's tiles,
softplus, D·u, writing y), the slope is the state update itself.

    python benchmarks/scan.py --state-sweep --shape light-128 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name: (batch, groups, channels per group, N, L)
    "light": (1, 4, 72, 10, 64 * 64),
    "light-128": (1, 4, 72, 10, 128 * 128),  # a 128x128 LR image, as benchmarks/deploy_speed.py
    "classic": (1, 4, 360, 16, 48 * 48),
    "light-512": (1, 4, 72, 10, 512 * 512),
}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _inputs(shape: tuple[int, ...], grad: bool):
    import torch

    batch, groups, per_group, n, length = shape
    dp = groups * per_group
    g = torch.Generator().manual_seed(0)
    t = {
        "u": torch.randn(batch, dp, length, generator=g),
        "delta": torch.randn(batch, dp, length, generator=g) * 0.5 - 1.0,
        "A": -torch.exp(torch.randn(dp, n, generator=g)),
        "B": torch.randn(batch, groups, n, length, generator=g),
        "C": torch.randn(batch, groups, n, length, generator=g),
        "D": torch.ones(dp),
        "delta_bias": torch.randn(dp, generator=g) * 0.5,
    }
    for v in t.values():
        v.requires_grad_(grad)
    return t


def worker(backend: str, shape_name: str, repeats: int, threads: int, fwd_only: bool) -> dict:
    """Runs in the subprocess: memory high-water marks, then timings. Returns a JSON-able dict."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "src"))
    from qmambair.scan import selective_scan

    shape = SHAPES[shape_name]

    def step(inputs, backward: bool):
        y = selective_scan(**inputs, delta_softplus=True, backend=backend)
        if backward:
            y.backward(torch.ones_like(y))
            for v in inputs.values():
                v.grad = None

    t0 = time.perf_counter()
    step(_inputs((1, shape[1], 2, 2, 5), True), True)  # compile or load kernels
    first_call = time.perf_counter() - t0
    res = {"first_call_s": first_call}
    inputs = _inputs(shape, grad=True)
    base = _maxrss_mb()
    with torch.no_grad():
        step(inputs, False)
    res["mem_fwd_mb"] = _maxrss_mb() - base
    modes = [("fwd", False)]
    if not fwd_only:
        step(inputs, True)
        res["mem_fwdbwd_mb"] = _maxrss_mb() - base
        modes.append(("fwdbwd", True))
    for name, backward in modes:
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            with torch.set_grad_enabled(backward):
                step(inputs, backward)
            if i:  # the first run is warm-up
                times.append(time.perf_counter() - start)
        res[f"{name}_ms"] = statistics.median(times) * 1e3
    return res


def interleaved(shape_name: str, repeats: int, threads: int, backends=("ref", "cpu", "chunked"),
                ref_repeats: int | None = None) -> None:
    """Time the backends round-robin in this process; print medians and speed-ups over ``ref``.
    ``cpu-tile64`` is the 'cpu' backend with forward tiles of 64 positions. ``ref_repeats``: the reference
    loop runs only in the first that many repeats (default: all)."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "src"))
    from qmambair.scan import cpu as scan_cpu
    from qmambair.scan import selective_scan

    inputs = _inputs(SHAPES[shape_name], grad=True)
    tile = scan_cpu.TILE

    def run(backend: str, backward: bool) -> float:
        scan_cpu.TILE = 64 if backend == "cpu-tile64" else tile
        backend = "cpu" if backend == "cpu-tile64" else backend
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            y = selective_scan(**inputs, delta_softplus=True, backend=backend)
            if backward:
                y.backward(torch.ones_like(y))
        for v in inputs.values():
            v.grad = None
        return time.perf_counter() - start

    times = {(b, m): [] for b in backends for m in (False, True)}
    for backend in backends:  # warm-up: kernel compilation / cache load, allocations
        run(backend, True)
    for r in range(repeats):
        for backward in (False, True):
            for backend in backends:
                if backend != "ref" or ref_repeats is None or r < ref_repeats:
                    times[backend, backward].append(run(backend, backward))
    scan_cpu.TILE = tile
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    b, g, c, n, length = SHAPES[shape_name]
    print(f"# selective scan, {shape_name} (batch {b}, D'={g * c}, N={n}, L={length}), one process, "
          f"{threads} threads, torch {torch.__version__}, median of {repeats} interleaved runs\n")
    print("| backend | fwd ms | fwd+bwd ms | fwd speed-up vs ref | fwd+bwd speed-up vs ref |")
    print("|---|---:|---:|---:|---:|")
    for backend in backends:
        f, fb = med[backend, False], med[backend, True]
        up, up_b = med["ref", False] / f, med["ref", True] / fb
        print(f"| {backend} | {f:,.1f} | {fb:,.1f} | {up:.1f}× | {up_b:.1f}× |")


def state_sweep(shape_name: str, repeats: int, threads: int, states=(1, 2, 4, 10, 16)) -> dict[int, float]:
    """Median seconds of the fused CPU forward (no grad) of ``shape_name`` with each number of states, the
    cases run in turn; prints a table and returns {N: seconds}."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from qmambair.scan import selective_scan
    from qmambair.train.trainer import set_threads

    set_threads(threads)  # torch's and numba's threads
    b, g, c, _, length = SHAPES[shape_name]
    inputs = {n: _inputs((b, g, c, n, length), grad=False) for n in states}

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            selective_scan(**inputs[n], delta_softplus=True, backend="cpu")
        return time.perf_counter() - start

    times: dict[int, list[float]] = {n: [] for n in states}
    for n in states:  # warm-up: kernel compilation / cache load, allocations
        run(n)
    for _ in range(repeats):
        for n in states:
            times[n].append(run(n))
    med = {n: statistics.median(v) for n, v in times.items()}
    items = b * g * c * length  # (position, channel) pairs
    print(f"# fused CPU scan forward, {shape_name} (batch {b}, D'={g * c}, L={length}) with N states, one "
          f"process, {threads} threads, torch {torch.__version__}, median of {repeats} interleaved runs\n")
    print("| N | fwd ms | ns per (position, channel) | ns per state update |")
    print("|---:|---:|---:|---:|")
    for n in states:
        per_item = med[n] / items * 1e9
        print(f"| {n} | {med[n] * 1e3:,.1f} | {per_item:.2f} | {per_item / n:.3f} |")
    return med


def _spawn(args: list[str], threads: int, extra_env: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads), **(extra_env or {}))
    env.pop("QMAMBAIR_SCAN", None)
    out = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def compile_time(threads: int) -> float | None:
    """Seconds to compile the numba kernels from an empty cache (in a subprocess)."""
    with tempfile.TemporaryDirectory() as cache:
        code = (
            f"import sys, json; sys.path.insert(0, {str(ROOT / 'src')!r}); import torch; "
            "from qmambair.scan import cpu; "
            "print(json.dumps({'s': cpu.warm_up() if cpu.AVAILABLE else None}))"
        )
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_NUM_THREADS=str(threads))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["s"] if out.returncode == 0 else None


def _fmt(v, unit="") -> str:
    return "–" if v is None else f"{v:,.1f}{unit}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ref-repeats", type=int, default=3, help="repeats for the slow reference loop")
    p.add_argument("--large", action="store_true", help="also the 512x512 light x2 forward (cpu, chunked)")
    p.add_argument("--worker", nargs=2, metavar=("BACKEND", "SHAPE"), help=argparse.SUPPRESS)
    p.add_argument("--fwd-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--interleaved", action="store_true", help="one-process side-by-side timing (see above)")
    p.add_argument("--shape", choices=tuple(SHAPES), default="light", help="shape for --interleaved")
    p.add_argument("--tile-ab", action="store_true",
                   help="--interleaved: also the cpu kernel with forward tiles of 64 positions")
    p.add_argument("--state-sweep", action="store_true",
                   help="time the cpu forward of --shape with N = 1, 2, 4, 10, 16 states (see above)")
    a = p.parse_args()
    if a.state_sweep:
        state_sweep(a.shape, a.repeats, a.threads)
        return
    if a.interleaved:
        backends = ("ref", "cpu", "cpu-tile64", "chunked") if a.tile_ab else ("ref", "cpu", "chunked")
        interleaved(a.shape, a.repeats, a.threads, backends, a.ref_repeats if a.tile_ab else None)
        return
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.repeats, a.threads, a.fwd_only)))
        return

    import torch

    print(f"# selective scan, torch {torch.__version__}, {a.threads} threads, {os.cpu_count()} CPUs\n")
    compile_s = compile_time(a.threads)
    jobs = [(s, b) for s in ("light", "classic") for b in ("ref", "cpu", "chunked")]
    if a.large:
        jobs += [("light-512", "cpu"), ("light-512", "chunked")]
    results = {}
    for shape, backend in jobs:
        reps = a.ref_repeats if backend == "ref" else a.repeats
        if shape == "light-512":
            reps = 2
        args = ["--worker", backend, shape, "--repeats", str(reps), "--threads", str(a.threads)]
        results[shape, backend] = _spawn(args + (["--fwd-only"] if shape == "light-512" else []), a.threads)
        print(f"  measured {shape:9s} {backend:8s} {results[shape, backend]}", file=sys.stderr)

    print("| shape (batch, D', N, L) | backend | fwd ms | fwd+bwd ms | fwd × ref | fwd+bwd × ref "
          "| peak MB fwd | peak MB fwd+bwd |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape, backend in jobs:
        r = results[shape, backend]
        b, g, c, n, length = SHAPES[shape]
        label = f"{shape} ({b}, {g * c}, {n}, {length})"
        if "error" in r:
            print(f"| {label} | {backend} | error: {r['error']} | | | | | |")
            continue
        ref = results.get((shape, "ref"), {})
        sf = ref.get("fwd_ms") / r["fwd_ms"] if "fwd_ms" in ref else None
        sb = ref.get("fwdbwd_ms") / r["fwdbwd_ms"] if "fwdbwd_ms" in ref and "fwdbwd_ms" in r else None
        print(
            f"| {label} | {backend} | {_fmt(r['fwd_ms'])} | {_fmt(r.get('fwdbwd_ms'))} | {_fmt(sf, '×')} "
            f"| {_fmt(sb, '×')} | {_fmt(r['mem_fwd_mb'])} | {_fmt(r.get('mem_fwdbwd_mb'))} |"
        )
    cache_load = results.get(("light", "cpu"), {}).get("first_call_s")
    print(
        f"\nnumba compile (empty cache): {_fmt(compile_s, ' s')}; first call with the cache filled "
        f"(load + tiny run): {_fmt(cache_load, ' s')}. Times are medians after one warm-up run; memory is "
        "the ru_maxrss rise over a baseline taken after warm-up, in a fresh process per row."
    )


if __name__ == "__main__":
    main()
