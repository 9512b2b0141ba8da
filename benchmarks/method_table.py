"""The method table of the evidence campaign (part 3): many quantized models of one float model, one table.

Every ``--model LABEL=PATH`` (a model file, or a run folder standing for its ``model.safetensors``), the float
model (``--float``) and bicubic are scored with ``qmambair test``'s code on the sets of
``benchmarks/margin_table.py`` (the built-in images, 192-px centre crops, and the photo pool's test split,
256-px centre crops; Y PSNR, border = scale). Each model's row gives its mean PSNR per set and its difference
to the float model with a 95 % interval over images (paired per image). A model whose output has NaN or inf
values on some images (unstable on inputs of that size) is reported as diverging on that set.

    python benchmarks/method_table.py --scale 4 --threads 2 \\
        --float campaign/x4-fp3/best-step3000.safetensors \\
        --model "Q-MambaIR W2A2=runs/campaign/table-x4/runs/qmambair-w2a2" \\
        --model "MinMax PTQ W8A8=runs/campaign/table-x4-ptq/runs/minmax-w8a8" \\
        --out docs/campaign/table-x4.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from margin_table import SETS, SETS_TEXT, paired, score, write_report  # noqa: E402  (sibling script)


def parse_model(text: str) -> tuple[str, Path]:
    label, sep, path_text = text.partition("=")
    if not sep or not label or not path_text:
        raise SystemExit(f"method_table: error: --model wants LABEL=PATH, got {text!r}")
    path = Path(path_text)
    path = path / "model.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"method_table: error: {path} does not exist (has the run finished?)")
    return label, path


def rows_for(scores: dict[str, dict[str, list[float]]], float_label: str) -> list[dict]:
    """One row per model (in the order given): mean PSNR per set, difference to the float model ± 95 %, and
    how many images the model's output had NaN or inf values on (scored NaN; then mean and difference are
    not defined)."""
    rows = []
    for label, per_set in scores.items():
        row: dict = {"label": label}
        for name, _ in SETS:
            key = name.lstrip("@")
            values = per_set[name]
            row[key + "_images"] = len(values)
            row[key + "_nonfinite"] = sum(math.isnan(v) for v in values)
            if row[key + "_nonfinite"]:
                row[key], row[key + "_diff"] = math.nan, None
                continue
            row[key] = statistics.fmean(values)
            is_float = label == float_label
            row[key + "_diff"] = None if is_float else paired(values, scores[float_label][name])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    sets = [name.lstrip("@") for name, _ in SETS]
    head = "| model | " + " | ".join(f"{s} ({rows[0][s + '_images']} images) | − float (95 %)" for s in sets)
    lines = [head + " |", "|---|" + "---:|---:|" * len(sets)]
    for r in rows:
        cells = []
        for s in sets:
            diff, unstable = r[s + "_diff"], r[s + "_nonfinite"]
            if unstable:
                cells += [f"diverges (NaN/inf output on {unstable} of {r[s + '_images']} images)", "—"]
                continue
            cells += [f"{r[s]:.3f}", "—" if diff is None else f"{diff[0]:+.3f} ± {diff[1]:.3f}"]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--float", dest="float_model", type=Path, required=True, help="the float model file")
    p.add_argument("--model", action="append", required=True, metavar="LABEL=PATH")
    p.add_argument("--scale", type=int, default=4, choices=(2, 3, 4))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write the table (Markdown) here")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    models = [parse_model(text) for text in args.model]
    if not args.float_model.is_file():
        raise SystemExit(f"method_table: error: {args.float_model} does not exist")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise SystemExit(f"method_table: error: {args.out} exists; pass --overwrite to replace it")

    from qmambair.train.machine import describe_machine
    from qmambair.train.trainer import set_threads

    set_threads(args.threads)
    start = time.perf_counter()
    float_label = "float"
    scores = {"bicubic": score("bicubic", args.scale), float_label: score(args.float_model, args.scale)}
    for label, path in models:
        scores[label] = score(path, args.scale)
    sources = "; ".join(f"{label}: {path}" for label, path in [(float_label, args.float_model), *models])
    report = (f"Light ×{args.scale}. {SETS_TEXT}, border {args.scale}; the interval is over images (paired "
              f"with the float model), not over training seeds. Models: {sources}. Machine: "
              f"{describe_machine()}; scored in {time.perf_counter() - start:.0f} s by "
              f"`benchmarks/method_table.py`.\n\n{table(rows_for(scores, float_label))}\n")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
