"""Does Q-MambaIR's W2A2 margin over LSQ grow with the float model? (evidence campaign, part 2)

Each ``--point LABEL=FLOAT,QMAMBAIR_RUN,LSQ_RUN`` is one float checkpoint and the two QAT runs started from
it with the same budget and seed (a run folder stands for its final weights, ``model.safetensors``; model
files are taken as they are). Every model and bicubic
are scored with ``qmambair test``'s code on two sets: the built-in images (192-px centre crops) and the
photo pool's test split (256-px centre crops, the crops of training validation). The Markdown table gives,
per set, the float model's gain over bicubic, the Q-MambaIR and LSQ PSNR, and the margin Q-MambaIR − LSQ
with a 95 % interval over images (paired per image: it says how consistent the margin is across images, not
how it varies with the training seed). ``--plot`` draws the margin against the float gain.
``--across-seeds`` reads the points as seeds of one configuration (same float model and budget) and adds a
second table: per set, each method's mean ± standard deviation over seeds (of the per-seed image means) and
the paired difference Q-MambaIR − LSQ over seeds with its 95 % Student-t interval (seeds − 1 degrees of
freedom), the interval that says how the margin varies with the training seed.

    python benchmarks/margin_table.py --scale 4 --threads 2 \\
        --point shipped=src/qmambair/weights/light-sr-x4-fp.safetensors,runs/qat-qm,runs/qat-lsq \\
        --point step1000=campaign/x4-fp3/best-step1000.safetensors,runs/qat2-qm,runs/qat2-lsq \\
        --out docs/campaign/margin-x4.md --plot docs/campaign/margin-x4.png
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SETS = (("@builtin", 192), ("@pool", 256))  # (named set, centre crop in target pixels)
SETS_TEXT = ("Sets: built-in images (192-px centre crops) and the photo pool's test split (256-px centre "
             "crops); Y-channel PSNR (dB)")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 16: 2.120, 20: 2.086, 25: 2.060, 30: 2.042}  # Student t, two-sided 95 %


@dataclass(frozen=True)
class Point:
    label: str
    float_model: Path
    qmambair_run: Path
    lsq_run: Path


def write_report(report: str, out: Path | None) -> None:
    """Print the report and, with ``out``, write it there (folders made as needed)."""
    print(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)


def t95(dof: int) -> float:
    """Two-sided 95 % Student t quantile (table value at or below ``dof``; 1.96 for large samples)."""
    if dof > 30:
        return 1.96
    return T95[max(k for k in T95 if k <= dof)]


def parse_point(text: str) -> Point:
    label, sep, rest = text.partition("=")
    parts = rest.split(",")
    if not sep or not label or len(parts) != 3:
        raise SystemExit(f"margin_table: error: --point wants LABEL=FLOAT,QMAMBAIR_RUN,LSQ_RUN, got {text!r}")
    paths = [Path(p) / "model.safetensors" if Path(p).is_dir() else Path(p) for p in parts]
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"margin_table: error: {path} does not exist (has the run finished?)")
    return Point(label, *paths)


@functools.cache  # points that share a float model (seeds) score it once
def score(model_spec: str | Path, scale: int) -> dict[str, list[float]]:
    """Named set -> PSNR of each image (Y channel, border ``scale``), for a model file or "bicubic"."""
    from qmambair.eval.bicubic import BicubicUpsampler
    from qmambair.eval.testset import model_degradation, named_test_set, score_test_set
    from qmambair.loading import load_model
    from qmambair.train.validate import metric_settings

    model = BicubicUpsampler(scale) if model_spec == "bicubic" else load_model(model_spec).eval()
    degradation = model_degradation(model, scale)
    border, y_channel = metric_settings(degradation)
    out = {}
    for name, crop in SETS:
        test_set = named_test_set(name)
        scores = score_test_set(model, test_set, degradation, border, y_channel, centre_crop=crop)
        out[name] = [s.psnr for s in scores]
    return out


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a − b and the half-width of its 95 % interval over the pairs (images, or seeds)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if len(diffs) < 2:
        return diffs[0], math.nan
    return statistics.fmean(diffs), t95(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def _stdev(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def across_seeds(rows: list[dict]) -> list[dict]:
    """Per set: mean ± std over the points (seeds) of each method's PSNR, and the paired difference with the
    half-width of its 95 % interval over seeds (nan with one seed)."""
    out = []
    for name in dict.fromkeys(r["set"] for r in rows):
        pts = [r for r in rows if r["set"] == name]
        q, lsq = [r["qmambair"] for r in pts], [r["lsq"] for r in pts]
        margin, ci = paired(q, lsq)
        out.append(dict(set=name, seeds=len(pts), qmambair=statistics.fmean(q), qmambair_sd=_stdev(q),
                        lsq=statistics.fmean(lsq), lsq_sd=_stdev(lsq), margin=margin, ci=ci))
    return out


def seeds_table(summary: list[dict]) -> str:
    lines = ["| set | seeds | Q-MambaIR W2A2 (mean ± std) | LSQ W2A2 (mean ± std) "
             "| Q-MambaIR − LSQ, paired (95 % over seeds) |", "|---|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(f"| {r['set']} | {r['seeds']} | {r['qmambair']:.3f} ± {r['qmambair_sd']:.3f} | "
                     f"{r['lsq']:.3f} ± {r['lsq_sd']:.3f} | {r['margin']:+.3f} ± {r['ci']:.3f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = ("| float checkpoint | set | images | bicubic | float | float − bicubic | Q-MambaIR W2A2 "
            "| LSQ W2A2 | Q-MambaIR − LSQ (95 % over images) |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['set']} | {r['images']} | {r['bicubic']:.3f} | {r['float']:.3f} | "
            f"{r['gain']:+.3f} | {r['qmambair']:.3f} | {r['lsq']:.3f} | {r['margin']:+.3f} ± {r['ci']:.3f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, scale: int) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, _ in SETS:
        pts = [r for r in rows if r["set"] == name.lstrip("@")]
        ax.errorbar([r["gain"] for r in pts], [r["margin"] for r in pts], yerr=[r["ci"] for r in pts],
                    marker="o", capsize=3, label=name.lstrip("@"))
        for r in pts if name == SETS[0][0] else []:  # one label per checkpoint
            ax.annotate(r["label"], (r["gain"], r["margin"]), textcoords="offset points", xytext=(4, 4))
    ax.axhline(0.0, color="0.5", linestyle=":")
    ax.set_xlabel(f"float ×{scale} gain over bicubic (dB)")
    ax.set_ylabel("Q-MambaIR − LSQ at W2A2 (dB)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--point", action="append", required=True, metavar="LABEL=FLOAT,QMAMBAIR_RUN,LSQ_RUN")
    p.add_argument("--scale", type=int, default=4, choices=(2, 3, 4))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write the table (Markdown) here")
    p.add_argument("--plot", type=Path, help="write the margin plot (PNG) here")
    p.add_argument("--across-seeds", action="store_true",
                   help="the points are seeds of one configuration: add the table over seeds")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    points = [parse_point(text) for text in args.point]
    for target in (args.out, args.plot):
        if target is not None and target.exists() and not args.overwrite:
            raise SystemExit(f"margin_table: error: {target} exists; pass --overwrite to replace it")

    from qmambair.train.machine import describe_machine
    from qmambair.train.trainer import set_threads

    set_threads(args.threads)
    start = time.perf_counter()
    bicubic = score("bicubic", args.scale)
    rows = []
    for pt in points:
        f, q, lsq = (score(m, args.scale) for m in (pt.float_model, pt.qmambair_run, pt.lsq_run))
        for name, _ in SETS:
            margin, ci = paired(q[name], lsq[name])
            rows.append(dict(label=pt.label, set=name.lstrip("@"), images=len(f[name]),
                             bicubic=statistics.fmean(bicubic[name]), float=statistics.fmean(f[name]),
                             gain=paired(f[name], bicubic[name])[0], qmambair=statistics.fmean(q[name]),
                             lsq=statistics.fmean(lsq[name]), margin=margin, ci=ci))
    text = table(rows)
    if args.across_seeds:
        summary = seeds_table(across_seeds(rows))
        text += f"\n\nOver seeds (each seed's mean over the set's images):\n\n{summary}"
    sources = "; ".join(f"{pt.label}: {pt.float_model}, {pt.qmambair_run}, {pt.lsq_run}" for pt in points)
    report = (f"Light ×{args.scale}, W2A2. {SETS_TEXT}, border {args.scale}. Models: {sources}. Machine: "
              f"{describe_machine()}; scored in {time.perf_counter() - start:.0f} s by "
              f"`benchmarks/margin_table.py`.\n\n{text}\n")
    write_report(report, args.out)
    if args.plot and plot(rows, args.plot, args.scale) is None:
        print("margin_table: matplotlib is not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
