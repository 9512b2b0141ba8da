"""Learning curve of a training run, and how long reaching a target gain over bicubic would take.

Reads RUN/log.jsonl (the trainer's validation events: PSNR of the model and of bicubic on the validation
images) and prints a Markdown table: step, validation PSNR, gain over bicubic. With two or more validations
after step 0 it fits gain = a + b·log10(step) (the usual shape of a restoration network's curve at this
scale) and extrapolates the step at which the gain reaches ``--target`` dB, converted to hours with the
run's median seconds per step (from its ``train`` events; the machine it ran on, with whatever ran beside
it). ``--init-psnr`` adds the starting model's validation as step 0 (e.g. from its model card).

    python benchmarks/learning_curve.py runs/campaign/x4-fp2 --target 1.0 --init-psnr 38.872
    python benchmarks/learning_curve.py runs/campaign/x4-fp2 --out docs/curves/x4-fp2.md
    python benchmarks/learning_curve.py runs/campaign/x4-fp3 --target 1.3 --at 3000
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

REACH = 100  # extrapolations beyond this many times the steps so far are reported as out of reach


def read_log(run: Path) -> tuple[list[dict], list[float]]:
    """(validation events, seconds per step of each logged training window)."""
    log = run / "log.jsonl"
    if not log.is_file():
        raise SystemExit(f"learning_curve: error: {log} does not exist")
    vals, rates = [], []
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "val":
            vals.append(event)
        elif event.get("event") == "train" and event.get("it_s"):
            rates.append(1.0 / float(event["it_s"]))
    return vals, rates


def fit_log(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares (a, b) of gain = a + b·log10(step) over points with step > 0; None below two."""
    pts = [(math.log10(s), g) for s, g in points if s > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return my - b * mx, b


def report(run: Path, target: float, init_psnr: float | None, at: list[int] | None = None) -> str:
    vals, rates = read_log(run)
    if not vals:
        return f"{run}: no validation yet\n"
    base = float(vals[0]["psnr_base"])
    points = [(0, init_psnr - base)] if init_psnr is not None else []
    points += [(int(v["step"]), float(v["psnr"]) - base) for v in vals]
    lines = [
        f"### {run.name}",
        "",
        f"Validation: {vals[0].get('n', '?')} images, bicubic {base:.3f} dB. "
        f"Median {statistics.median(rates):.2f} s/step over {len(rates)} logged windows." if rates else "",
        "",
        "| step | PSNR (dB) | gain over bicubic (dB) |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {s} | {g + base:.3f} | {g:+.3f} |" for s, g in points]
    fit = fit_log(points)
    lines.append("")
    if fit is None:
        lines.append("Fewer than two validations after step 0: no extrapolation yet.")
    else:
        a, b = fit
        lines.append(f"Fit: gain = {a:+.3f} {b:+.3f}·log10(step) dB.")
        if b <= 0:
            lines.append(f"The gain did not grow over this window, so no extrapolation to +{target:.2f} dB; "
                         "a window this short may only show the restart of the learning-rate schedule.")
        elif (exponent := (target - a) / b) > math.log10(REACH * points[-1][0]):
            lines.append(f"At this slope ({b:+.3f} dB per tenfold steps) the fit does not reach "
                         f"+{target:.2f} dB within {REACH}× the steps so far ({points[-1][0]:,}); a short or "
                         "dipping window may not show the stage's real slope.")
        else:
            step = 10**exponent
            hours = step * statistics.median(rates) / 3600 if rates else float("nan")
            lines.append(f"Extrapolated: +{target:.2f} dB at step ≈ {step:,.0f} (≈ {hours:,.1f} h at the "
                         "median step time; an extrapolation of a log fit, not a measurement).")
        for step_at in at or []:
            gain = a + b * math.log10(step_at)
            lines.append(f"The fit at step {step_at:,}: {gain:+.3f} dB (an extrapolation).")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with log.jsonl)")
    p.add_argument("--target", type=float, default=1.0, help="gain over bicubic to extrapolate to (dB)")
    p.add_argument("--init-psnr", type=float, help="validation PSNR of the starting model (step 0)")
    p.add_argument("--at", type=int, action="append", metavar="STEP",
                   help="also print the fit's gain at this step, e.g. the run's last (repeatable)")
    p.add_argument("--out", type=Path, help="write the Markdown here (refuses an existing file)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    text = "\n".join(report(run, args.target, args.init_psnr, args.at) for run in args.runs)
    if args.out is None:
        sys.stdout.write(text)
        return
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"learning_curve: error: {args.out} exists (use --overwrite)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
