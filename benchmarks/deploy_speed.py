"""Deployment speed: float vs fake-quant vs int8 (PyTorch) vs ONNX (float and QDQ), one input, one process.

Cases, all on the same (1, 3, S, S) LR input (``--size``, default 128) and interleaved (each repeat runs every
case once, in turn; the table gives medians and ratios):

- ``float``: the shipped float model (``light-sr-x{scale}-fp``), PyTorch;
- ``fake-quant``: the shipped packed model (``--packed``, default light-sr-x4-qmambair-w4a4), PyTorch float
  path (weights decoded once, activations quantized by the fused kernels);
- ``int8``: the same packed model in integer inference (``qmambair.quant.int8``: int8 codes, int8 x int8 ->
  int32 products, exact offset corrections);
- ``onnx-float`` / ``onnx-qdq`` (``--onnx``): the float model and the packed model exported at the input size
  and run by onnxruntime (CPU, ``--threads`` intra-op threads that sleep rather than spin between runs, so
  that no case takes CPU from the one after it).

A second table splits each PyTorch case's time (forward hooks, one extra run each) into the selective scan
with its input quantizers, the quantized (or, for float, the corresponding) conv/linear/projection layers,
and the rest. File sizes of the float safetensors, the .qmb and the ONNX graphs are listed too, and with
``--onnx`` the node counts of both graphs as onnxruntime optimised them, by operator type (where the QDQ
graph's extra time goes: many small nodes).

    python benchmarks/deploy_speed.py --threads 2 --repeats 5
    python benchmarks/deploy_speed.py --threads 2 --repeats 3 --size 32 --onnx --out deploy-32.md

``--malloc keep`` (default) reuses freed memory as ``qmambair restore`` does at start-up
(``qmambair.allocator.keep_freed_memory``); ``--malloc default`` keeps glibc's thresholds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import torch


def _median_ms(times: list[float]) -> float:
    return 1000.0 * statistics.median(times)


def time_shares(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Seconds of one forward spent in the scan (with its input quantizers), in conv/linear/projection
    layers, and elsewhere (forward hooks; the scan's and layers' children are not counted twice)."""
    from qmambair.models.ss2d import Projection, ScanOp

    spent: dict[str, float] = defaultdict(float)
    handles = []

    def watch(module: torch.nn.Module, key: str) -> None:
        def pre(mod, args):
            mod._deploy_t0 = time.perf_counter()

        def post(mod, args, out):
            spent[key] += time.perf_counter() - mod._deploy_t0

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for module in model.modules():
        if isinstance(module, ScanOp):
            watch(module, "scan")
        elif isinstance(module, torch.nn.Conv2d | torch.nn.Linear | Projection):
            watch(module, "layers")
    try:
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    return {"scan": spent["scan"], "layers": spent["layers"], "total": total}


def onnx_node_counts(path: Path, threads: int) -> Counter:
    """Operator types of the graph at ``path`` as onnxruntime optimises it for this machine (from a session
    of its own, not timed, which writes the optimised graph beside ``path``)."""
    import onnx

    from qmambair.export_onnx import onnx_session

    optimized = path.with_name(path.stem + "-optimized.onnx")
    onnx_session(path, threads, optimized_path=optimized)
    return Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)


def node_table(counts: dict[str, Counter], most: int = 12) -> list[str]:
    """Markdown rows: total nodes per graph, then the ``most`` operator types whose counts differ most."""
    names = list(counts)

    def spread(op: str) -> tuple[int, str]:
        values = [c[op] for c in counts.values()]
        return min(values) - max(values), op  # largest difference first, then by name

    ops = sorted(set().union(*counts.values()), key=spread)
    header = f"| nodes after onnxruntime's optimisation | {' | '.join(names)} |"
    lines = [header, "|---|" + "---:|" * len(names)]
    lines.append("| all | " + " | ".join(str(sum(c.values())) for c in counts.values()) + " |")
    for op in ops[:most]:
        lines.append(f"| {op} | " + " | ".join(str(counts[name][op]) for name in names) + " |")
    return lines


def build_cases(
    args: argparse.Namespace, workdir: Path
) -> tuple[dict[str, Callable[[], None]], dict[str, torch.nn.Module], dict[str, int], torch.Tensor, dict]:
    """(cases: name -> run once, PyTorch models for the time split, file sizes in bytes, the input, ONNX node
    counts per graph)."""
    from qmambair.export_onnx import export_onnx, onnx_session
    from qmambair.loading import load_model
    from qmambair.models.shipped import shipped_path
    from qmambair.quant.integer import enable_integer_inference

    fp_path = shipped_path(f"light-sr-x{args.scale}-fp")
    packed_path = shipped_path(args.packed)
    if fp_path is None or packed_path is None:
        raise SystemExit(f"shipped model not found: light-sr-x{args.scale}-fp or {args.packed}")
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    fp = load_model(fp_path).eval()
    fake = load_model(packed_path).eval()
    int8 = load_model(packed_path).eval()
    enable_integer_inference(int8, strict=True)

    def forward(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(x)

        return run

    cases = {"float": forward(fp), "fake-quant": forward(fake), "int8": forward(int8)}
    nodes: dict[str, Counter] = {}
    sizes = {"float .safetensors": fp_path.stat().st_size, f"{args.packed}.qmb": packed_path.stat().st_size}
    if args.onnx:
        array = x.numpy()
        for name, model, fmt in (("onnx-float", fp, "float"), ("onnx-qdq", fake, "qdq")):
            path = workdir / f"{name}.onnx"
            start = time.perf_counter()
            export_onnx(model, path, tile=args.size, fmt=fmt)
            print(f"exported {name} in {time.perf_counter() - start:.0f} s")
            sizes[f"{name}.onnx"] = path.stat().st_size
            nodes[name] = onnx_node_counts(path, args.threads)
            session = onnx_session(path, args.threads, spinning=False)  # no CPU taken from the next case
            feed = {session.get_inputs()[0].name: array}
            cases[name] = lambda session=session, feed=feed: session.run(None, feed)
    return cases, {"float": fp, "fake-quant": fake, "int8": int8}, sizes, x, nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=128, help="LR input side (default 128)")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--packed", default="light-sr-x4-qmambair-w4a4", help="shipped packed model name")
    parser.add_argument("--onnx", action="store_true", help="also export and time ONNX float and QDQ graphs")
    parser.add_argument("--out", type=Path, help="also write the tables as markdown to this file (new file)")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: reuse freed memory as `qmambair restore` does (qmambair.allocator); "
                             "default: glibc's own thresholds")
    args = parser.parse_args()
    if args.out is not None and args.out.exists():
        raise SystemExit(f"{args.out} exists; choose another file")

    from qmambair.allocator import keep_freed_memory
    from qmambair.train.trainer import set_threads

    if args.malloc == "keep":
        keep_freed_memory()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cases, models, sizes, x, nodes = build_cases(args, Path(tmp))
        for run in cases.values():  # warm-up: numba compilation, caches, onnxruntime allocations
            run()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, run in cases.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        shares = {name: time_shares(model, x) for name, model in models.items()}

    base = _median_ms(times["float"])
    lines = [
        f"Deployment speed: light x{args.scale}, input 1x3x{args.size}x{args.size}, packed model "
        f"{args.packed}, {args.threads} threads, {args.repeats} interleaved repeats (medians), "
        f"malloc {args.malloc}, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}.",
        "",
        "| case | median ms | x float (PyTorch) |",
        "|---|---:|---:|",
    ]
    for name, t in times.items():
        lines.append(f"| {name} | {_median_ms(t):.0f} | {_median_ms(t) / base:.2f} |")
    if "onnx-qdq" in times:
        ratio = _median_ms(times["onnx-qdq"]) / _median_ms(times["onnx-float"])
        lines += ["", f"QDQ ONNX / float ONNX: {ratio:.2f}"]
    lines += ["", "| case | scan (+ its quantizers) | conv/linear/projection layers | rest | total ms |",
              "|---|---:|---:|---:|---:|"]
    for name, s in shares.items():
        rest = s["total"] - s["scan"] - s["layers"]
        lines.append(
            f"| {name} | {s['scan'] / s['total']:.0%} | {s['layers'] / s['total']:.0%} | "
            f"{rest / s['total']:.0%} | {1000 * s['total']:.0f} |"
        )
    float_size = sizes["float .safetensors"]
    lines += ["", "| file | bytes | x float file |", "|---|---:|---:|"]
    for name, size in sizes.items():
        lines.append(f"| {name} | {size} | {size / float_size:.2f} |")
    if nodes:
        lines += [""] + node_table(nodes)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
