"""Markdown tables from training logs (``log.jsonl`` of ``qmambair train``/``qat`` runs), for docs/results.md.

    python benchmarks/val_table.py curve runs/x4-qmambair-w2a2 runs/x4-lsq-w2a2 --names Q-MambaIR,LSQ
    python benchmarks/val_table.py last runs/shipped/light-x4-*-w2a2

``curve``: test-split PSNR at every validation of each run, side by side, with the difference of the first
two runs. ``last``: the last validation (PSNR, SSIM) and the wall time of each run. Each argument is a run
folder or a ``log.jsonl`` file (small logs can be committed beside the table they produce).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def read_log(path: Path) -> list[dict[str, Any]]:
    """The events of a run: ``path`` is a run folder (``log.jsonl`` inside) or the log file itself."""
    log = path / "log.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def validations(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """step -> validation event (a resumed run's repeated step keeps the last one)."""
    return {int(e["step"]): e for e in events if e.get("event") == "val"}


def wall_seconds(events: list[dict[str, Any]]) -> float:
    return sum(float(e.get("seconds", 0.0)) for e in events if e.get("event") == "end")


def curve_table(runs: list[list[dict[str, Any]]], names: list[str]) -> str:
    vals = [validations(events) for events in runs]
    steps = sorted(set().union(*vals))
    tail = " | difference |" if len(runs) > 1 else " |"
    head = "| step | " + " | ".join(f"{n} (dB)" for n in names) + tail
    lines = [head, "|---:|" + "---:|" * (len(runs) + (len(runs) > 1))]
    for step in steps:
        cells = [f"{v[step]['psnr']:.3f}" if step in v else "" for v in vals]
        if len(runs) > 1:
            both = step in vals[0] and step in vals[1]
            cells.append(f"{vals[0][step]['psnr'] - vals[1][step]['psnr']:+.3f}" if both else "")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def last_table(runs: list[list[dict[str, Any]]], names: list[str]) -> str:
    lines = ["| run | PSNR (dB) | SSIM | wall time (min) |", "|---|---:|---:|---:|"]
    for name, events in zip(names, runs, strict=True):
        vals = validations(events)
        if not vals:
            raise SystemExit(f"{name}: no validation in the log")
        last = vals[max(vals)]
        minutes = wall_seconds(events) / 60
        lines.append(f"| {name} | {last['psnr']:.3f} | {last['ssim']:.4f} | {minutes:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("curve", "last"))
    p.add_argument("runs", nargs="+", type=Path, help="run folders or log.jsonl files")
    p.add_argument("--names", default="", help="comma-separated column/row names (default: folder names)")
    args = p.parse_args()
    names = args.names.split(",") if args.names else [r.stem if r.is_file() else r.name for r in args.runs]
    if len(names) != len(args.runs):
        raise SystemExit("--names needs one name per run")
    runs = [read_log(r) for r in args.runs]
    print(curve_table(runs, names) if args.kind == "curve" else last_table(runs, names))


if __name__ == "__main__":
    main()
