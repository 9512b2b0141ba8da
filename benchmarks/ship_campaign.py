"""Ship the training campaign's models: the float model and QAT runs into the package, with model cards.

    python benchmarks/ship_campaign.py --scale 4 --float campaign/x4-fp3/best-step3000.safetensors \\
        --qat campaign/table-x4/runs/qmambair-w4a4 --qat campaign/table-x4/runs/lsq-w4a4 \\
        --qat campaign/table-x4/runs/qmambair-w2a2 --qat campaign/table-x4/runs/lsq-w2a2 --overwrite

``--float`` is a float model file of a campaign run (``model.safetensors`` or ``best-step<N>.safetensors``)
whose ``log.jsonl`` lies beside it; it is copied to ``light-sr-x<s>-fp.safetensors``. Each ``--qat`` is a
finished QAT run folder (``model.safetensors`` and ``log.jsonl``) that started from that float model (its
start file, named in its log, must be present: it is compared tensor by tensor); it is packed to
``light-sr-x<s>-<method>-w<b>a<b>.qmb``. Every model gets a card (``model_card.py``): data, budget, start,
machine, wall time and test PSNR/SSIM, all read from the run logs; a float run that continued an earlier
shipped model names the commit and budget of that model from its card in git, and ``--float-start TEXT``
describes the start of one that did not. Existing files are replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import model_card as card
from qmambair.fileio import atomic_path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "src" / "qmambair" / "weights"


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def fail(message: str) -> None:
    raise SystemExit(f"ship_campaign: error: {message}")


def git(*args: str) -> str:
    """Output of a git command in the repository ('' when git fails)."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def card_rows(text: str) -> dict[str, str]:
    """The ``| key | value |`` rows of a Markdown model card."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[0] and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = "|".join(cells[1:])
    return rows


def earlier_model(init: str, before: float) -> str:
    """How the shipped model a run continued was made: its card at the last commit before ``before``."""
    path = Path(init)
    if not init or ROOT / path.parent != WEIGHTS:
        return f"`{init}`" if init else "random init"
    commit = git("log", "-1", "--format=%h", f"--before=@{int(before)}", "--", str(path)).strip()
    rows = card_rows(git("show", f"{commit}:{path.with_suffix('.md')}")) if commit else {}
    if not rows:
        return f"`{path.name}` (the shipped model of that name when the run started)"
    patch = re.search(r"HR patches \d+ px", rows.get("data", ""))
    return (f"`{path.name}` as shipped at commit `{commit}` (its card there: {rows.get('budget', '?')}"
            f"{', ' + patch.group(0) if patch else ''}; "
            f"from {rows.get('starts from', '?')}; {rows.get('wall time', '?')} on "
            f"{rows.get('machine', '?').split(';')[0]})")


def weights_step(path: Path, events: list[dict[str, Any]]) -> int:
    match = re.fullmatch(r"best-step(\d+)\.safetensors", path.name)
    return int(match.group(1)) if match else card.run_times(events)[1]


def validation_at(events: list[dict[str, Any]], step: int) -> dict[str, Any]:
    vals = [e for e in events if e.get("event") == "val" and e.get("step") == step]
    return vals[-1] if vals else card.last_validation(events)


def machine_text(events: list[dict[str, Any]], cfg: dict[str, Any], note: str) -> str:
    """The machines the run's log records, else ``note`` (what the campaign's notes say), and its threads."""
    seen = card.machines(events)
    where = ", ".join(seen) if seen else note or "not recorded in the run's log"
    threads = cfg.get("threads") or "default"
    return f"{where}; {threads} torch thread(s) per run"


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def command_text(run: Path) -> str:
    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    args = shlex.join(sys.argv[1:])
    return (f"campaign run `{run}` (commands in `campaign/README.md`); shipped by `python "
            f"benchmarks/ship_campaign.py {args}` at commit `{commit}`")


def ship_float(source: Path, dest: Path, preset: str, note: str, start: str = "") -> None:
    events = card.read_log(source.parent / "log.jsonl")
    cfg = card.run_config(events)
    step = weights_step(source, events)
    seconds, last = card.run_times(events)
    best = " (the best validation of the run)" if source.name.startswith("best-") else ""
    rows = [
        ("file", f"`{dest.name}` ({source.stat().st_size:,} bytes)"),
        ("data", card.data_text(cfg)),
        ("training photos", card.photo_licences()),
        ("degradation", f"MATLAB bicubic ×{preset.rsplit('x', 1)[-1]}"),
        ("budget", f"{card.budget_text(cfg, last)}; the weights of step {step:,}{best}"),
        ("starts from", start or earlier_model(cfg.get("init", ""), events[0]["time"])),
        ("command", command_text(source.parent)),
        ("machine", machine_text(events, cfg, note)),
        ("wall time", f"{seconds / 60:.1f} min (this stage)"),
        ("test PSNR / SSIM", card.test_text(validation_at(events, step), cfg)),
    ]
    intro = f"MambaIR {preset} (full precision), the ×{preset[-1]} float model of the training campaign."
    with atomic_path(dest) as tmp:
        tmp.write_bytes(source.read_bytes())
    write_text(dest.with_suffix(".md"), card.render_card(dest.stem, intro, rows))


def ship_qat(run: Path, dest: Path, float_dest: Path, note: str) -> None:
    from qmambair.loading import load_model
    from qmambair.quant.pack import export_packed

    events = card.read_log(run / "log.jsonl")
    cfg = card.run_config(events)
    seconds, step = card.run_times(events)
    quant = cfg["quant"]
    export_packed(load_model(run / "model.safetensors").eval(), dest)
    ratio = dest.stat().st_size / float_dest.stat().st_size
    rows = [
        ("file", f"`{dest.name}` ({dest.stat().st_size:,} bytes)"),
        ("data", card.data_text(cfg)),
        ("training photos", card.photo_licences()),
        ("degradation", f"MATLAB bicubic ×{cfg['preset'].rsplit('x', 1)[-1]}"),
        ("budget", card.budget_text(cfg, step)),
        ("starts from", f"`{float_dest.name}` (the float model shipped with it)"),
        ("command", command_text(run)),
        ("machine", machine_text(events, cfg, note)),
        ("wall time", f"{seconds / 60:.1f} min"),
        ("test PSNR / SSIM", card.test_text(card.last_validation(events), cfg)),
    ]
    intro = (f"MambaIR {cfg['preset']} ({quant['method']} W{quant['bits']}A{quant['bits']}, QAT), from the "
             "training campaign.")
    extra = f"Packed: {quant['bits']}-bit weight codes; {ratio:.3f}× the float32 file."
    write_text(dest.with_suffix(".md"), card.render_card(dest.stem, intro, rows, extra))


def qat_name(run: Path, scale: int, float_model: Path) -> str:
    """The shipped name of a finished QAT run, after checking it is one and that it started from the float."""
    log, model = run / "log.jsonl", run / "model.safetensors"
    if not (log.is_file() and model.is_file()):
        fail(f"{run} is not a finished run (it needs log.jsonl and model.safetensors)")
    cfg = card.run_config(card.read_log(log))
    quant = cfg.get("quant") or {}
    if cfg["preset"] != f"light-sr-x{scale}" or quant.get("method") not in ("qmambair", "lsq"):
        fail(f"{run}: a {cfg['preset']} {quant.get('method', 'float')} run, not light-sr-x{scale} "
             "Q-MambaIR or LSQ")
    if set(quant) - {"method", "bits"}:
        extra = sorted(set(quant) - {"method", "bits"})
        fail(f"{run}: quantizer options {extra} (an ablation?) are not shipped")
    init = Path(cfg["init"])
    if not init.is_file():
        fail(f"{run} started from {init}, which is not here: cannot check it is {float_model}")
    if not same_tensors(init, float_model):
        fail(f"{run} started from {init}, whose weights differ from {float_model}")
    return f"light-sr-x{scale}-{quant['method']}-w{quant['bits']}a{quant['bits']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, required=True, choices=(2, 4))
    p.add_argument("--float", dest="float_model", type=Path, required=True, metavar="FILE")
    p.add_argument("--qat", type=Path, action="append", default=[], metavar="RUN")
    p.add_argument("--machine", action="append", default=[], metavar="RUN=TEXT",
                   help="the machine of a run (its folder as given) whose log does not record one")
    p.add_argument("--float-start", default="", metavar="TEXT",
                   help="what the float run started from, for its card, when its init is not a shipped model")
    p.add_argument("--dest", type=Path, default=WEIGHTS)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    notes = dict(text.partition("=")[::2] for text in args.machine)
    known = {str(args.float_model.parent), *map(str, args.qat)}
    if "" in notes.values() or set(notes) - known:
        fail(f"--machine wants RUN=TEXT with RUN one of {sorted(known)}")
    if not (args.float_model.is_file() and (args.float_model.parent / "log.jsonl").is_file()):
        fail(f"{args.float_model} is not a float model file with its run's log.jsonl beside it")
    preset = f"light-sr-x{args.scale}"
    if card.run_config(card.read_log(args.float_model.parent / "log.jsonl"))["preset"] != preset:
        fail(f"{args.float_model} is not a {preset} model")
    float_dest = args.dest / f"{preset}-fp.safetensors"
    targets = {run: args.dest / f"{qat_name(run, args.scale, args.float_model)}.qmb" for run in args.qat}
    outputs = [float_dest, *targets.values()]
    if len(set(outputs)) != len(outputs):
        fail("two --qat runs would be shipped under one name")
    inputs = {args.float_model.resolve(), *(run.resolve() / "model.safetensors" for run in args.qat)}
    for out in outputs:
        for path in (out, out.with_suffix(".md")):
            if path.resolve() in inputs:
                fail(f"{path} is one of the inputs")
            if path.exists() and not args.overwrite:
                fail(f"{path} exists; pass --overwrite to replace it")
    args.dest.mkdir(parents=True, exist_ok=True)
    float_note = notes.get(str(args.float_model.parent), "")
    ship_float(args.float_model, float_dest, preset, float_note, args.float_start)
    print(f"{float_dest}")
    for run, dest in targets.items():
        ship_qat(run, dest, float_dest, notes.get(str(run), ""))
        print(f"{dest}")


if __name__ == "__main__":
    main()
