"""One budget, one seed, every method: each quantizer trained (or calibrated) from one float model, compared.

    rows = run_benchmark(BenchmarkSpec(methods=["fp", "qmambair", "lsq", "minmax"], bits=[4, 2], iters=500))

Only the quantizer changes (docs/evaluation.md §6): ``OUT/runs/fp`` trains the float model (``fp_iters``),
or holds a copy of an existing one (``fp_from``, e.g. the final model of a long float campaign);
``OUT/runs/<method>-wXaX`` is QAT from it for ``iters`` steps, or calibration on the first ``calib_patches``
training patches for the PTQ methods; ``ablation`` adds ``OUT/runs/ablation-{base,dls,rfa}-wXaX`` (Q-MambaIR
with DLS and/or RFA off). Every model is evaluated on whole images (MambaIR tiling) of the trainer's test
split and of each ``bench`` folder by ``qmambair.train.validate.evaluate`` (Y-channel PSNR/SSIM, border =
scale), and ``OUT/results.csv``, ``results.md`` and ``psnr_vs_bits.png`` are written. Reruns are cheap:
finished runs (their log reached ``iters``) are skipped, interrupted ones resume from ``last.pt``, and numbers
are cached in each run's ``eval.json`` (keyed by the model file and the test images). ``only`` splits the
work over processes or machines sharing ``OUT``: each trains its runs (after the float run they all start
from); the trainer's folder lock stops two processes from training one run; a last call without ``only``
evaluates and reports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import Degradation, EvalImages, find_pairs, load_samples, min_eval_size
from ..fileio import atomic_path
from ..quant.convert import METHODS, PTQ_METHODS, SUPPORTED_BITS, QuantConfig
from ..train.machine import describe_machine
from .report import Column, markdown_table, plot_metric_vs_bits, write_csv

__all__ = ["BenchmarkSpec", "DEFAULT_METHODS", "run_benchmark"]

DEFAULT_METHODS = (
    "fp",
    "qmambair",
    "lsq",
    "lsq+",
    "pams",
    "dorefa",
    "quantsr",
    "n2uq",
    "minmax",
    "percentile",
)
# ablation key -> (row label, use_dls, use_rfa); "both" is the qmambair run itself
ABLATION = {
    "base": ("Act_Quant + LSQ weights", False, False),
    "dls": ("+DLS", True, False),
    "rfa": ("+RFA", False, True),
}


@dataclass
class BenchmarkSpec:
    """What to compare and under which budget (see the module docstring)."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    bits: list[int] = field(default_factory=lambda: [4, 3, 2])
    scale: int = 0  # 0: the preset's (4 without a preset)
    preset: str = ""  # "": light-sr-x{scale}
    iters: int = 1000  # each QAT run
    fp_iters: int = 0  # the float run (0: iters)
    fp_from: str = ""  # an existing float model to quantize instead of training one (any load_model file)
    data: str = "builtin"  # image folder or "builtin" (the fetched photo pool)
    bench: list[str] = field(default_factory=list)  # extra test folders (Set5/HR layout, or a parent of them)
    out: str = "runs/benchmark"
    seed: int = 0
    batch: int = 0  # 0: the preset's
    patch: int = 0  # HR patch; 0: the preset's
    threads: int = 0  # 0: library default
    device: str = "auto"
    model: dict[str, Any] = field(default_factory=dict)  # build_model overrides for the float model
    interp_init: bool = True  # the float run starts as bicubic-like upsampling (qmambair.models.init)
    ablation: bool = False
    ablation_bits: list[int] = field(default_factory=list)  # []: every entry of bits
    calib_patches: int = 32  # PTQ calibration set: the first training patches
    tile: int = 200  # MambaIR tiling threshold for whole-image evaluation (LR pixels)
    test_images: int = 0  # use at most this many images of the test split (0: all)
    save_every: int = 0  # QAT/float runs: resumable checkpoint every N steps (0: the trainer's default)
    only: list[str] = field(default_factory=list)  # train/calibrate just these runs (plus fp); no report

    def __post_init__(self) -> None:
        from ..models.presets import get_preset

        self.preset = self.preset or f"light-sr-x{self.scale or 4}"
        deg = Degradation.from_dict(get_preset(self.preset).get("degradation", {}))
        if deg.kind != "bicubic":
            raise ValueError(f"the benchmark compares super-resolution presets; {self.preset} is {deg}")
        if self.scale and deg.factor != self.scale:
            raise ValueError(f"preset {self.preset} is x{deg.factor}, not x{self.scale}: drop one of them")
        self.scale = deg.factor
        self.fp_iters = int(self.fp_iters or self.iters)
        valid = ("fp", *METHODS)
        self.methods = list(
            dict.fromkeys("fp" if m.lower() == "fp" else _canonical(m, valid) for m in self.methods)
        )
        self.bits = list(dict.fromkeys(int(b) for b in self.bits))
        self.ablation_bits = list(dict.fromkeys(int(b) for b in self.ablation_bits))
        bad = sorted(set(self.bits + self.ablation_bits) - set(SUPPORTED_BITS))
        if bad:
            choices = ", ".join(map(str, SUPPORTED_BITS))
            raise ValueError(f"unsupported bit-width(s) {bad}; choose from {choices}")
        if not self.methods:
            raise ValueError(f"no method given; choose from {', '.join(valid)}")
        if min(self.iters, self.fp_iters, self.calib_patches) < 1:
            raise ValueError("iters, fp_iters and calib_patches must be >= 1")
        if self.ablation_bits:
            self.ablation = True
        if self.fp_from and not Path(self.fp_from).is_file():
            raise ValueError(f"float model {self.fp_from} does not exist")
        if self.save_every < 0:
            raise ValueError("save_every must be >= 0")
        self.only = list(dict.fromkeys(self.only))
        unknown = sorted(set(self.only) - {r.name for r in plan_runs(self)})
        if unknown:
            names = ", ".join(r.name for r in plan_runs(self))
            raise ValueError(f"--only: no run named {', '.join(unknown)} in this benchmark; "
                             f"its runs: {names}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchmarkSpec:
        """Build from a dict (e.g. after ``--set`` overrides), naming the valid keys if one is unknown."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown benchmark option(s) {unknown}; valid: {', '.join(sorted(names))}")
        return cls(**data)


def _canonical(method: str, valid: tuple[str, ...]) -> str:
    try:
        return QuantConfig(method=method).method
    except ValueError:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(valid)}") from None


@dataclass(frozen=True)
class _Run:
    name: str  # folder under OUT/runs
    method: str  # row label
    bits: int | None
    quant: dict[str, Any]  # {} = full precision
    group: str = "method"


def plan_runs(spec: BenchmarkSpec) -> list[_Run]:
    """The float run, then one run per method and bit-width, then the ablation runs."""
    runs = [_Run("fp", "fp", None, {})]
    for m in (m for m in spec.methods if m != "fp"):
        slug = m.replace("+", "plus")
        runs += [_Run(f"{slug}-w{b}a{b}", m, b, {"method": m, "bits": b}) for b in spec.bits]
    if spec.ablation:
        for b in spec.ablation_bits or spec.bits:
            for key, (_, dls, rfa) in ABLATION.items():
                quant = {"method": "qmambair", "bits": b, "use_dls": dls, "use_rfa": rfa}
                runs.append(_Run(f"ablation-{key}-w{b}a{b}", f"ablation-{key}", b, quant, "ablation"))
            if "qmambair" not in spec.methods:  # the "both" row
                runs.append(_Run(f"qmambair-w{b}a{b}", "qmambair", b, {"method": "qmambair", "bits": b}))
    return runs


def _train_config(spec: BenchmarkSpec, run: _Run, run_dir: Path, fp_model: Path) -> Any:
    from ..train.config import make_config

    data = spec.data if spec.data in ("", "builtin") else str(Path(spec.data).resolve())
    iters = spec.iters if run.quant else spec.fp_iters
    extra = (
        {"quant": run.quant, "init": str(fp_model)}
        if run.quant
        else {"model": spec.model, "interp_init": spec.interp_init}
    )
    return make_config(
        None,
        [],
        out=str(run_dir),
        preset=spec.preset,
        data=data,
        iters=iters,
        seed=spec.seed,
        batch=spec.batch or None,
        patch=spec.patch or None,
        threads=spec.threads,
        device=spec.device,
        val_every=iters,
        val_images=spec.test_images,
        save_every=spec.save_every or None,
        **extra,
    ).resolved()


def _events(run_dir: Path) -> list[dict[str, Any]]:
    log = run_dir / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


_SAME = ("preset", "model", "quant", "data", "iters", "batch", "patch", "seed", "lr", "degradation",
         "interp_init")


def _train(run: _Run, cfg: Any, progress: bool, say: Callable[[str], None]) -> None:
    """Train ``run`` unless its log says it finished; resume it from last.pt when interrupted."""
    from ..train.trainer import train

    out, want = Path(cfg.out), cfg.to_dict()
    events = _events(out)
    starts = [e["config"] for e in events if e.get("event") == "start"]
    diff = [k for k in _SAME if starts and starts[-1].get(k) != want[k]]
    if diff:
        raise ValueError(
            f"{out} holds a run with other settings ({', '.join(diff)} differ); "
            "use another --out or delete that folder"
        )
    done = any(e.get("event") == "end" and e.get("step") == cfg.iters for e in events)
    if done and (out / "model.safetensors").exists():
        return
    resume = (out / "last.pt").exists()
    say(f"{run.name}: {'resuming' if resume else 'training'} ({cfg.iters} iterations)")
    train(cfg, resume=resume, progress=progress)


def _calibrate(
    run: _Run,
    out: Path,
    fp_model: Path,
    patches: torch.Tensor,
    batch: int,
    device: torch.device,
    say: Callable[[str], None],
) -> None:
    """Post-training quantization of the float model, calibrated on ``patches``; skipped when up to date."""
    from ..loading import load_model
    from ..models.checkpoint import save_model
    from ..quant.calibrate import calibrate
    from ..quant.convert import quantize_model

    stamp = {"quant": run.quant, "float_model": _fingerprint(fp_model), "patches": _digest(patches)}
    marker = out / "ptq.json"
    old = json.loads(marker.read_text()) if marker.exists() else {}
    if (out / "model.safetensors").exists() and {k: old.get(k) for k in stamp} == stamp:
        return
    say(f"{run.name}: calibrating on {len(patches)} patches")
    started = time.perf_counter()
    model = quantize_model(load_model(fp_model), QuantConfig(**run.quant)).to(device)
    calibrate(model, patches, batch_size=batch, device=device, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out / "model.safetensors")
    _write_json(marker, {**stamp, "seconds": time.perf_counter() - started})


def _adopt_float(source: Path, out: Path, preset: str, say: Callable[[str], None]) -> None:
    """Make ``source`` the benchmark's float model: saved once as ``out/model.safetensors`` (project format)
    with its SHA-256 in ``out/adopted.json``; a folder holding another float model is refused."""
    from ..loading import load_model
    from ..models.checkpoint import save_model

    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    marker = out / "adopted.json"
    if (out / "model.safetensors").exists() or marker.exists():
        old = json.loads(marker.read_text()) if marker.exists() else {}
        if old.get("sha256") == digest and (out / "model.safetensors").exists():
            return
        raise ValueError(f"{out} holds another float model than {source}; use another --out or delete {out}")
    model = load_model(source)
    if getattr(model, "quant_config", None) is not None:
        raise ValueError(f"{source} is a quantized model; --from needs the float model")
    if getattr(model, "preset", None) not in (None, preset):
        raise ValueError(f"{source} is a {model.preset} model, the benchmark runs {preset}")
    say(f"fp: using {source}")
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out / "model.safetensors")
    _write_json(marker, {"source": str(source), "sha256": digest})


def _fingerprint(path: Path) -> str:
    return f"{path.stat().st_size}:{path.stat().st_mtime_ns}"


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1))


def _bench_folders(folder: str) -> list[tuple[str, Path]]:
    """``(name, folder)``: the folder itself (``HR/`` layout or plain images) or each ``NAME/HR`` below it."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark folder {root} does not exist")
    subs = [] if (root / "HR").is_dir() else [p for p in sorted(root.iterdir()) if (p / "HR").is_dir()]
    return [(p.name, p) for p in subs] or [(root.resolve().name, root)]


def _test_sets(spec: BenchmarkSpec, cfg: Any, deg: Degradation, channels: int) -> tuple[Any, dict]:
    """The training patches and ``{name: EvalImages}``: the trainer's test split, then the bench folders."""
    from ..data.photos import cache_root
    from ..train.trainer import build_datasets

    train_set, val_set, _ = build_datasets(dataclasses.replace(cfg, val_crop=0), deg, channels)
    sets = {"test": val_set} if val_set is not None else {}
    for folder in spec.bench:
        for name, path in _bench_folders(folder):
            samples, _ = load_samples(
                find_pairs(path, deg.factor), deg, channels, min_eval_size(deg), cache_dir=cache_root() / "lr"
            )
            if not samples:
                raise ValueError(f"no usable images in benchmark folder {path}")
            key, k = name, 2
            while key in sets:
                key, k = f"{name}-{k}", k + 1
            sets[key] = EvalImages(samples, deg)
    if not sets:
        raise ValueError("nothing to evaluate on: the data has no test split and no --bench folder was given")
    return train_set, sets


def _evaluate(
    run_dir: Path, sets: dict[str, EvalImages], tile: int, device: torch.device, say: Callable[[str], None]
) -> dict[str, dict[str, float]]:
    """Metrics of ``run_dir/model.safetensors`` per test set, cached in ``run_dir/eval.json``."""
    from ..loading import load_model
    from ..train.distributed import DistInfo
    from ..train.validate import evaluate

    path, cache_file = run_dir / "model.safetensors", run_dir / "eval.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if cache.get("model") != _fingerprint(path):
        cache = {"model": _fingerprint(path), "sets": {}}
    model = None
    for name, images in sets.items():
        key = hashlib.sha1(f"{tile}|{[s.name for s in images.samples]}".encode()).hexdigest()[:16]
        if cache["sets"].get(name, {}).get("key") == key:
            continue
        if model is None:
            say(f"{run_dir.name}: evaluating")
            model = load_model(path).to(device)
        result = evaluate(model, images, DistInfo(device=device), tile, baseline=run_dir.name == "fp")
        cache["sets"][name] = {"key": key, **result}
        _write_json(cache_file, cache)
    return {name: cache["sets"][name] for name in sets}


def _seconds(run_dir: Path) -> float | None:
    """Training wall time (all sessions of the run) or calibration time."""
    if (run_dir / "ptq.json").exists():
        return json.loads((run_dir / "ptq.json").read_text()).get("seconds")
    ends = [e.get("seconds", 0.0) for e in _events(run_dir) if e.get("event") == "end"]
    return sum(ends) if ends else None


def run_benchmark(
    spec: BenchmarkSpec, log: Callable[[str], None] | None = None, progress: bool = False
) -> list[dict[str, Any]]:
    """Run (or resume) every run of ``spec``, evaluate, write the report; returns one row per model.

    Rows: ``method``, ``bits`` (None for bicubic and fp), ``precision``, ``group`` (baseline, method or
    ablation), ``run``, ``psnr_<set>``/``ssim_<set>`` for each test set and ``seconds`` (training or
    calibration wall time). ``log`` receives one line per action.
    """
    from ..models.presets import get_preset
    from ..train.trainer import set_threads

    say = log or (lambda _: None)
    runs_dir = Path(spec.out) / "runs"
    if spec.threads > 0:
        set_threads(spec.threads)
    device = torch.device(
        "cuda"
        if spec.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if spec.device == "auto"
        else spec.device
    )
    preset = get_preset(spec.preset)
    deg = Degradation.from_dict(preset.get("degradation", {}))
    channels = int({**preset["model"], **spec.model}.get("in_chans", 3))

    fp_model = runs_dir / "fp" / "model.safetensors"
    fp_cfg = _train_config(spec, _Run("fp", "fp", None, {}), fp_model.parent, fp_model)
    train_set, sets = _test_sets(spec, fp_cfg, deg, channels)
    say(f"{len(train_set)} training images; test: " + ", ".join(f"{k} ({len(v)})" for k, v in sets.items()))
    runs = plan_runs(spec)
    patches = None
    for run in runs:
        run_dir = runs_dir / run.name
        if spec.only and run.name not in spec.only and run.name != "fp":  # fp: every run starts from it
            continue
        if run.name == "fp" and spec.fp_from:
            _adopt_float(Path(spec.fp_from), run_dir, spec.preset, say)
        elif run.quant and QuantConfig(**run.quant).is_ptq:
            if patches is None:
                patches = torch.stack([train_set[i][0] for i in range(spec.calib_patches)])
            _calibrate(run, run_dir, fp_model, patches, fp_cfg.batch, device, say)
        else:
            _train(run, _train_config(spec, run, run_dir, fp_model), progress, say)

    if spec.only:
        say(f"trained {', '.join(spec.only)}; run without --only to evaluate every run and write the report")
        return []
    rows: list[dict[str, Any]] = [{"method": "bicubic", "bits": None, "precision": "-", "group": "baseline"}]
    for run in runs:
        row: dict[str, Any] = {
            "method": run.method,
            "bits": run.bits,
            "group": run.group,
            "run": run.name,
            "precision": f"W{run.bits}A{run.bits}" if run.bits else "FP32",
        }
        if run.quant.get("method") == "qmambair":
            row.update(use_dls=run.quant.get("use_dls", True), use_rfa=run.quant.get("use_rfa", True))
        for name, m in _evaluate(runs_dir / run.name, sets, spec.tile, device, say).items():
            row.update({f"psnr_{name}": m["psnr"], f"ssim_{name}": m["ssim"]})
            if run.name == "fp":  # the bicubic row: evaluate()'s baseline
                rows[0].update({f"psnr_{name}": m["psnr_base"], f"ssim_{name}": m["ssim_base"]})
        rows.append({**row, "seconds": _seconds(runs_dir / run.name)})
    fp_row = rows[1]
    if "fp" not in spec.methods:
        rows.remove(fp_row)
    _report(spec, rows, sets, len(train_set), fp_cfg, device, fp_row)
    return rows


def _report(
    spec: BenchmarkSpec,
    rows: list[dict[str, Any]],
    sets: dict[str, EvalImages],
    n_train: int,
    cfg: Any,
    device: torch.device,
    fp_row: dict[str, Any],
) -> None:
    """``results.csv``, ``results.md`` (setup, results, ablation) and ``psnr_vs_bits.png`` in ``spec.out``."""
    out = Path(spec.out)
    write_csv(rows, out / "results.csv")
    metric_cols = [
        c
        for name in sets
        for c in (
            Column(f"psnr_{name}", f"{name} PSNR", ".3f"),
            Column(f"ssim_{name}", f"{name} SSIM", ".4f"),
        )
    ]
    main = [r for r in rows if r["group"] != "ablation"]
    if spec.data in ("", "builtin"):
        data = f"built-in photo pool (`qmambair data fetch`), {n_train} training photos, test split"
    else:
        data = (
            f"`{spec.data}`: {n_train} training images; test = {cfg.val_fraction:.0%} of the folder held "
            f"out (seed {cfg.seed})"
        )
    ptq = [m for m in spec.methods if m in PTQ_METHODS]
    lines = [
        f"# Quantization benchmark: {spec.preset}",
        "",
        f"- data: {data}; test sets: " + ", ".join(f"{k} ({len(v)} image(s))" for k, v in sets.items()),
        f"- budget: float model {f'`{spec.fp_from}`' if spec.fp_from else f'{spec.fp_iters} iterations'}, "
        f"each QAT run {spec.iters} iterations; batch "
        f"{cfg.batch}, HR patch {cfg.patch} px; Adam lr {cfg.lr:g}, L1"
        + (f"; PTQ ({', '.join(ptq)}): {spec.calib_patches} calibration patches, no training" if ptq else ""),
        f"- seed: {spec.seed}",
        f"- machine: {describe_machine(str(device))}",
        f"- metrics: Y-channel PSNR (dB) / SSIM, border crop {spec.scale}, whole images with MambaIR tiling "
        f"(threshold {spec.tile} px); time = training or calibration wall time in seconds",
        "",
        markdown_table(
            main,
            [
                Column("method", "method"),
                Column("precision", "W/A"),
                *metric_cols,
                Column("seconds", "time (s)", ".1f"),
            ],
        ),
    ]
    if spec.ablation:
        bits = spec.ablation_bits or spec.bits
        labels = {**{f"ablation-{k}": v[0] for k, v in ABLATION.items()}, "qmambair": "+DLS +RFA (Q-MambaIR)"}
        table = [
            {
                **r,
                "setting": labels[r["method"]],
                "use_dls": "yes" if r["use_dls"] else "no",
                "use_rfa": "yes" if r["use_rfa"] else "no",
            }
            for r in rows
            if r["method"] in labels and r["bits"] in bits
        ]
        table.sort(key=lambda r: (-r["bits"], list(labels).index(r["method"])))
        lines += [
            "## Component ablation (Q-MambaIR with DLS and/or RFA switched off)",
            "",
            markdown_table(
                table,
                [
                    Column("setting", "setting"),
                    Column("precision", "W/A"),
                    Column("use_dls", "DLS"),
                    Column("use_rfa", "RFA"),
                    *metric_cols,
                ],
            ),
        ]
    first = next(iter(sets))
    floors = {r["method"]: r[f"psnr_{first}"] for r in (rows[0], fp_row)}
    plot_rows = [{**r, "psnr": r.get(f"psnr_{first}")} for r in main if r["bits"]]
    if plot_metric_vs_bits(
        plot_rows, out / "psnr_vs_bits.png", title=f"{spec.preset}, {first} set", floors=floors
    ):
        lines += [f"![PSNR against bits on the {first} set](psnr_vs_bits.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
