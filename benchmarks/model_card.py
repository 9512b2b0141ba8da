"""Model cards of shipped models: the facts read from training logs, and the Markdown card itself.

Shared by ``train_shipped.py`` (models trained by that script) and ``ship_campaign.py`` (models of the
training campaign, ``campaign/README.md``). Every number on a card comes from the run's ``log.jsonl``: its
``start`` event (the configuration), its ``train``/``end`` events (steps, wall time), its last ``val`` event
(test PSNR/SSIM) and the ``machine`` its ``start``/``resume`` events record (runs logged before the trainer
recorded it have none).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from qmambair.data.photos import PHOTOS, split_of

FOOTER = "CPU-scale training: these numbers are not comparable to published MambaIR / Q-MambaIR tables."


def read_log(log: Path) -> list[dict[str, Any]]:
    """The events of a trainer's ``log.jsonl``."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def run_config(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The training configuration stored by the run's ``start`` event."""
    for event in events:
        if event.get("event") == "start":
            return event["config"]
    raise ValueError("the log has no start event")


def run_times(events: list[dict[str, Any]]) -> tuple[float, int]:
    """Total wall seconds over all sessions of a run and its last step.

    A session begins at ``start`` or ``resume``; it lasted its ``end`` event's ``seconds`` when it finished,
    else (killed, then resumed) the ``elapsed_s`` of its last ``train`` event, so the time after its last
    logged step is not counted.
    """
    seconds, step, session = 0.0, 0, 0.0
    for event in events:
        kind = event.get("event")
        if kind in ("start", "resume"):
            seconds, session = seconds + session, 0.0
        elif kind == "train":
            session = max(session, float(event.get("elapsed_s", 0.0)))
        elif kind == "end":
            session = max(session, float(event.get("seconds", 0.0)))
        if "step" in event:
            step = max(step, int(event["step"]))
    return seconds + session, step


def last_validation(events: list[dict[str, Any]]) -> dict[str, Any]:
    vals = [e for e in events if e.get("event") == "val"]
    if not vals:
        raise ValueError("the log has no validation event")
    return vals[-1]


def machines(events: list[dict[str, Any]]) -> list[str]:
    """The CPUs (and GPUs) the sessions of a run recorded, in order of first use, without repeats."""
    recorded = (e for e in events if e.get("event") in ("start", "resume") and "machine" in e)
    return list(dict.fromkeys(e["machine"].split(",")[0] for e in recorded))


def photo_licences(split: str = "train") -> str:
    """The licences of the pool's ``split`` (counted from ``PHOTOS``), for a card's training-photos row."""
    counts = Counter(p.licence for p in PHOTOS if split_of(p.name) == split)
    listed = ", ".join(f"{licence} ({n})" for licence, n in counts.most_common())
    return (f"{sum(counts.values())} photographs of the pool's {split} split, from Debian packages, under "
            f"their own licences (photos per licence): {listed}; each photo's licence and author are in the "
            "fetched `manifest.json` (docs/evaluation.md §5.2)")


def budget_text(cfg: dict[str, Any], step: int) -> str:
    """One stage's training budget from its configuration."""
    seed = f", seed {cfg['seed']}" if "seed" in cfg else ""
    return (f"{step:,} iterations, batch {cfg['batch']}, HR patches {cfg['patch']} px, "
            f"Adam lr {cfg['lr']:g}, MultiStepLR at {'/'.join(f'{m:g}' for m in cfg['milestones'])} of the "
            f"run, L1{seed}")


def data_text(cfg: dict[str, Any]) -> str:
    skip = cfg.get("patch_min_std") or 0
    skipped = f", patches with a standard deviation below {skip:g} redrawn" if skip else ""
    return f"built-in photo pool (`qmambair data fetch`), train split; flips/rotations{skipped}"


def test_text(val: dict[str, Any], cfg: dict[str, Any]) -> str:
    scale = cfg["preset"].rsplit("x", 1)[-1]
    return (f"{val['psnr']:.3f} dB / {val['ssim']:.4f} (bicubic {val['psnr_base']:.3f} dB / "
            f"{val['ssim_base']:.4f}) on {val['n']} test-split photos, centre crops of {cfg['val_crop']} px, "
            f"Y channel, border {scale} (the run's validation at step {val['step']:,})")


def render_card(name: str, intro: str, rows: list[tuple[str, str]], extra: str = "") -> str:
    """The Markdown card: a title, one sentence, a two-column table of facts, notes, the CPU-scale footer."""
    lines = [f"# {name}", "", intro, "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    if extra:
        lines += ["", extra]
    return "\n".join([*lines, "", FOOTER, ""])
