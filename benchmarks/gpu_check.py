"""GPU scan check: the CUDA implementations against the float64 reference loop (outputs and all gradients),
then timings, printed as Markdown tables. Needs torch with CUDA; triton and mamba_ssm are used if present.

Implementations checked: ``gpu/triton`` (this repo's Triton forward + chunked-recompute backward),
``gpu/mamba_ssm`` (if installed), ``chunked`` (pure PyTorch on CUDA tensors), and the dispatcher's automatic
choice. Accuracy: max |got - ref| / max |ref| per tensor, pass at <= 1e-4. Timing: CUDA-synchronised medians
after warm-up; the first call of each implementation (Triton compile) is reported separately; peak memory is
``torch.cuda.max_memory_allocated`` above the inputs.

    python benchmarks/gpu_check.py [--budget 150] [--quick]

Runs in about 1-2 minutes; stops starting new timings once ``--budget`` seconds have passed. Exit code 0 when
every accuracy check passed, 1 when one failed, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from qmambair.scan import resolve_backend, selective_scan, selective_scan_ref  # noqa: E402
from qmambair.scan.chunked import selective_scan_chunked  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
START = time.time()
DEVICE = "cuda"  # "cpu" only for --cpu-dry-run, which checks this script's logic on a machine without CUDA


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.time() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def short(e: BaseException) -> str:
    first = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:150]}"


def version(mod: str) -> str:
    if importlib.util.find_spec(mod) is None:
        return "missing"
    try:
        return getattr(__import__(mod), "__version__", "present")
    except Exception as e:  # noqa: BLE001
        return f"broken ({type(e).__name__}: {e})"


def make_inputs(batch, groups, per_group, n, length, *, z=True, D=True, bias=True, softplus=True,
                a_scale=None, delta_scale=0.5, seed=0, device="cuda"):  # fmt: skip
    g = torch.Generator(device="cpu").manual_seed(seed)
    dp = groups * per_group

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    delta = r(batch, dp, length) * delta_scale
    if not softplus:
        delta = delta.abs()
    A = -torch.exp(r(dp, n)) if a_scale is None else torch.full((dp, n), -a_scale, dtype=torch.float64)
    ins = {
        "u": r(batch, dp, length), "delta": delta, "A": A,
        "B": r(batch, groups, n, length), "C": r(batch, groups, n, length),
        "D": r(dp) if D else None, "z": r(batch, dp, length) if z else None,
        "delta_bias": torch.rand(dp, generator=g, dtype=torch.float64) * 0.5 if bias else None,
    }  # fmt: skip
    ins = {k: (v.to(DEVICE) if v is not None else None) for k, v in ins.items()}
    ins["delta_softplus"] = softplus
    return ins


def run(fn, ins, dtype, grad_out):
    leaves = {k: ins[k].detach().to(dtype).clone().requires_grad_() for k in NAMES if ins[k] is not None}
    out, last = fn(
        **{k: leaves.get(k) for k in NAMES}, delta_softplus=ins["delta_softplus"], return_last_state=True
    )
    out.backward(grad_out.to(dtype))
    res = {"out": out.detach().double(), "last": last.detach().double()}
    res.update({"d" + k: v.grad.double() if v.grad is not None else None for k, v in leaves.items()})
    return res


def implementations() -> dict:
    from qmambair.scan import gpu

    impls = {}
    if gpu._triton_kernel() is not None:
        impls["gpu/triton"] = lambda **kw: gpu.selective_scan_gpu(**kw, impl="triton")
    if gpu._mamba_ssm_fn() is not None:
        impls["gpu/mamba_ssm"] = lambda **kw: gpu.selective_scan_gpu(**kw, impl="mamba_ssm")
    impls["chunked"] = selective_scan_chunked
    impls["auto"] = selective_scan
    return impls


CASES = {
    "all options (2,32,10,300)": dict(batch=2, groups=4, per_group=8, n=10, length=300),
    "L=1, G=1": dict(batch=1, groups=1, per_group=16, n=16, length=1),
    "large decay A=-e^3": dict(
        batch=2, groups=4, per_group=8, n=10, length=200, a_scale=math.exp(3), delta_scale=4
    ),
    "bare, no softplus (G=2)": dict(batch=2, groups=2, per_group=12, n=16, length=129, z=False, D=False,
                                    bias=False, softplus=False),
    "light-like (1,288,10,1024)": dict(batch=1, groups=4, per_group=72, n=10, length=1024),
}  # fmt: skip


def accuracy(impls: dict) -> bool:
    print("\n## Accuracy vs float64 reference (max |err| / max |ref|; pass <= 1e-4)\n")
    print("| case | implementation | out | last state | worst grad (which) | first call s | result |")
    print("|---|---|---:|---:|---:|---:|---|")
    ok_all = True
    for case, cfg in CASES.items():
        ins = make_inputs(**cfg)
        grad_out = torch.randn(ins["u"].shape, dtype=torch.float64, device=DEVICE)
        ref = run(selective_scan_ref, ins, torch.float64, grad_out)
        for name, fn in impls.items():
            try:
                sync()
                t0 = time.time()
                got = run(fn, ins, torch.float32, grad_out)
                sync()
                first = time.time() - t0
                errs = {}
                for key, r in ref.items():
                    if got.get(key) is None:
                        errs[key] = float("inf")
                        continue
                    errs[key] = (got[key] - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
                    if r.abs().max().item() == 0:
                        errs[key] = got[key].abs().max().item()
                grads = {k: v for k, v in errs.items() if k.startswith("d")}
                worst = max(grads, key=grads.get)
                ok = all(math.isfinite(e) and e <= 1e-4 for e in errs.values())
                ok_all &= ok
                cells = f"{errs['out']:.1e} | {errs['last']:.1e} | {grads[worst]:.1e} ({worst}) | {first:.2f}"
                print(f"| {case} | {name} | {cells} | {'PASS' if ok else 'FAIL'} |", flush=True)
            except Exception as e:  # noqa: BLE001
                ok_all = False
                print(f"| {case} | {name} | error: {short(e)} | | | | FAIL |")
                log("".join(traceback.format_exception(e))[-3000:])
    return ok_all


def time_one(fn, ins, backward: bool, repeats: int) -> tuple[float, float]:
    """Median ms and peak MB above the inputs."""
    leaves = {k: ins[k].detach().float().requires_grad_(backward) for k in NAMES if ins[k] is not None}
    args = {k: leaves.get(k) for k in NAMES}

    def once():
        with torch.set_grad_enabled(backward):
            y = fn(**args, delta_softplus=True)
            if backward:
                y.backward(torch.ones_like(y))
                for v in leaves.values():
                    v.grad = None

    once()
    once()
    if DEVICE == "cpu":  # dry run: wall clock, no memory figure
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            once()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


SWEEP_SHAPE = (1, 4, 72, 10, 4096)  # Triton BLOCK_D sweep: light 64x64
TIMING_SHAPES = {  # (batch, groups, per group, N, L)
    "light 64x64 (1,288,10,4096)": (1, 4, 72, 10, 4096),
    "classic 48x48 (1,1440,16,2304)": (1, 4, 360, 16, 2304),
    "light train batch 16 (16,288,10,2304)": (16, 4, 72, 10, 2304),
}


def timings(impls: dict, budget: float, quick: bool) -> None:
    print("\n## Timings (CUDA events, median)\n")
    print("| shape | implementation | fwd ms | fwd+bwd ms | fwd+bwd × ref | peak MB fwd+bwd |")
    print("|---|---|---:|---:|---:|---:|")
    timed = {k: v for k, v in impls.items() if k != "auto"}
    timed["ref (loop, float32)"] = selective_scan_ref
    shapes = list(TIMING_SHAPES.items())[: 1 if quick else None]
    for label, (b, g, c, n, length) in shapes:
        ins = make_inputs(b, g, c, n, length, z=False)
        ref_ms = None
        for name in ["ref (loop, float32)"] + [k for k in timed if not k.startswith("ref")]:
            if time.time() - START > budget:
                print(f"| {label} | {name} | skipped (time budget) | | | |")
                continue
            if name.startswith("ref") and not label.startswith("light 64"):
                continue  # the Python loop is slow; one shape is enough for the ratio
            try:
                reps = 3 if name.startswith("ref") else 10
                fwd, _ = time_one(timed[name], ins, False, reps)
                fb, mem = time_one(timed[name], ins, True, reps)
                if name.startswith("ref"):
                    ref_ms = fb
                ratio = f"{ref_ms / fb:.1f}×" if ref_ms else "–"
                print(f"| {label} | {name} | {fwd:.2f} | {fb:.2f} | {ratio} | {mem:,.0f} |", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"| {label} | {name} | error: {short(e)} | | | |")
                log("".join(traceback.format_exception(e))[-3000:])
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    if "gpu/triton" in impls and time.time() - START < budget:
        from qmambair.scan.gpu import selective_scan_gpu

        print("\n### Triton forward, channels per program (light 64x64)\n")
        print("| BLOCK_D | fwd ms |")
        print("|---:|---:|")
        ins = make_inputs(*SWEEP_SHAPE, z=False)
        for block in (4, 8, 16, 32):
            try:
                fn = lambda block=block, **kw: selective_scan_gpu(**kw, impl="triton", block_d=block)  # noqa: E731
                print(f"| {block} | {time_one(fn, ins, False, 10)[0]:.2f} |", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"| {block} | error: {short(e)} |")


def dry_run() -> int:
    """Exercise this script on CPU with tiny shapes (Triton via TRITON_INTERPRET=1 if installed)."""
    global DEVICE, CASES, TIMING_SHAPES, SWEEP_SHAPE
    import contextlib

    from qmambair.scan import gpu

    DEVICE = "cpu"
    torch.cuda.device = lambda d: contextlib.nullcontext()  # the interpreter runs on host tensors
    gpu._block_d = lambda *a: 4

    def host_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                  return_last_state=False, impl="triton", block_d=None):  # fmt: skip
        out, last = gpu.TritonSelectiveScan.apply(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_d
        )
        return (out, last) if return_last_state else out

    gpu.selective_scan_gpu = host_scan  # skips the CUDA-tensor check
    CASES = {
        k: {**v, "length": min(v["length"], 12), "per_group": min(v["per_group"], 6)}
        for k, v in CASES.items()
    }
    TIMING_SHAPES = {"tiny (1,8,4,16)": (1, 4, 2, 4, 16)}
    SWEEP_SHAPE = (1, 4, 2, 4, 16)
    impls = {k: v for k, v in implementations().items() if k != "auto"}
    print(f"# dry run on CPU: {', '.join(impls)}")
    ok = accuracy(impls)
    timings(impls, 1e9, True)
    return 0 if ok else 1


def quant_check(budget: float) -> bool:
    """Quantized light ×4 (Q-MambaIR W2A2) on CUDA (eager quantizers) against the CPU fused path: output and
    parameter gradients, then CUDA training-step times of float vs Q-MambaIR vs LSQ (medians)."""
    from qmambair.models.presets import build_model
    from qmambair.quant.convert import QuantConfig, quantize_model

    print("\n## Quantized model on CUDA\n")
    torch.manual_seed(0)
    lr = torch.rand(2, 3, 24, 24)
    models = {}
    for method in ("fp", "qmambair", "lsq"):
        torch.manual_seed(0)
        m = build_model("light-sr-x4")
        if method != "fp":
            m = quantize_model(m, QuantConfig(method=method, bits=2))
            with torch.no_grad():
                m.train()(lr)
        models[method] = m
    cpu = models["qmambair"]
    gpu_model = quantize_model(build_model("light-sr-x4"), QuantConfig(method="qmambair", bits=2))
    gpu_model.load_state_dict(cpu.state_dict())
    gpu_model.cuda().train()
    out_c = cpu.train()(lr)
    out_c.abs().mean().backward()
    out_g = gpu_model(lr.cuda())
    out_g.abs().mean().backward()
    err = ((out_g.detach().cpu() - out_c.detach()).abs().max() / out_c.detach().abs().max()).item()
    grads_c = {k: p.grad for k, p in cpu.named_parameters() if p.grad is not None}
    worst = max(
        ((p.grad.cpu() - grads_c[k]).abs().max() / (grads_c[k].abs().max() + 1e-12)).item()
        for k, p in gpu_model.named_parameters()
        if p.grad is not None and k in grads_c
    )
    ok = err <= 1e-3 and worst <= 5e-2  # different scan/matmul kernels: codes at rounding edges may flip
    print(f"- CUDA vs CPU fused: output rel err {err:.2e}, worst parameter-gradient rel err {worst:.2e}: "
          f"{'PASS' if ok else 'FAIL'}")
    x, y = torch.rand(8, 3, 32, 32, device="cuda"), torch.rand(8, 3, 128, 128, device="cuda")
    rows = []
    for name, m in models.items():
        if time.time() - START > budget:
            break
        m = m.cuda().train()
        opt = torch.optim.Adam(m.parameters(), lr=1e-6, fused=True)

        def step(m=m, opt=opt):
            opt.zero_grad(set_to_none=True)
            (m(x) - y).abs().mean().backward()
            opt.step()

        step()
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append((name, statistics.median(times)))
    if rows:
        base = rows[0][1]
        print("\n| training step, batch 8, LR 32 | ms | × float |\n|---|---:|---:|")
        for name, ms in rows:
            print(f"| {name} | {ms:.1f} | {ms / base:.2f} |")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=150.0, help="seconds after which no new timing starts")
    p.add_argument("--quick", action="store_true", help="only the light shape in the timings")
    p.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.cpu_dry_run:
        return dry_run()
    print("# qmambair GPU scan check\n")
    print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
    print(f"- triton: {version('triton')}; mamba_ssm: {version('mamba_ssm')}")
    if not torch.cuda.is_available():
        print("\nNo CUDA device: nothing to check.")
        return 2
    props = torch.cuda.get_device_properties(0)
    print(f"- device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        print(f"- dispatcher picks for CUDA tensors: {resolve_backend(None, torch.zeros(1, device='cuda'))}")
    except Exception as e:  # noqa: BLE001
        print(f"- dispatcher error: {e}")
    impls = implementations()
    if "gpu/triton" not in impls:
        print("- triton is not importable: the Triton kernel is not tested; checking the other paths")
    print(f"- implementations under test: {', '.join(impls)}")
    ok = accuracy(impls)
    timings(impls, a.budget, a.quick)
    ok = quant_check(a.budget + 60) and ok
    print(f"\nAccuracy: {'ALL PASS' if ok else 'SOME FAILED'}; total {time.time() - START:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
