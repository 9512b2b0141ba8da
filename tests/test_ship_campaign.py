"""Shipping campaign models (``benchmarks/ship_campaign.py``, ``benchmarks/model_card.py``): the files
written, the numbers on the cards (checked against the hand-written logs they come from), and refusals."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from qmambair.experiments.benchmark import run_benchmark
from qmambair.loading import load_model
from qmambair.models.checkpoint import save_model
from qmambair.models.presets import build_model

from .benchmark_scripts import benchmark_scripts
from .test_benchmark import TINY, env, spec  # noqa: F401 (env is a fixture)


@pytest.fixture(scope="module")
def modules():
    with benchmark_scripts("model_card", "ship_campaign") as scripts:
        yield scripts


def test_wall_time_adds_every_session_including_killed_ones(modules):
    run_times = modules["model_card"].run_times
    events = [
        {"event": "start", "config": {}},
        {"event": "train", "step": 10, "elapsed_s": 40.0},
        {"event": "train", "step": 20, "elapsed_s": 80.0},
        {"event": "checkpoint", "step": 25},  # killed here: the session counts up to its last logged step
        {"event": "resume", "step": 25},
        {"event": "train", "step": 30, "elapsed_s": 12.5},
        {"event": "end", "step": 40, "seconds": 50.0},
    ]
    assert run_times(events) == (130.0, 40)
    assert modules["model_card"].machines(
        [{"event": "start", "machine": "CPU A, 1 torch thread(s)"}, {"event": "resume", "machine": "CPU B"},
         {"event": "resume", "machine": "CPU A, 2 torch thread(s)"}, {"event": "resume"}]
    ) == ["CPU A", "CPU B"]


def float_run(folder: Path, seed: int) -> Path:
    """A tiny float model and the log of the 'campaign run' that made it (written by hand)."""
    torch.manual_seed(seed)
    model = save_model(build_model("light-sr-x4", **TINY), folder / "best-step300.safetensors")
    config = {"preset": "light-sr-x4", "init": "", "batch": 8, "patch": 128, "lr": 1e-4, "seed": 0,
              "milestones": [0.5, 0.75], "patch_min_std": 0.06, "val_crop": 256, "threads": 1}
    val = {"psnr_base": 30.0, "ssim_base": 0.8, "n": 6}
    events = [
        {"event": "start", "time": 1.0, "config": config},
        {"event": "train", "step": 300, "elapsed_s": 600.0},
        {"event": "val", "step": 300, "psnr": 31.25, "ssim": 0.85, **val},
        {"event": "train", "step": 400, "elapsed_s": 900.0},
        {"event": "val", "step": 400, "psnr": 31.0, "ssim": 0.84, **val},
        {"event": "end", "step": 400, "seconds": 960.0},
    ]
    (folder / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return model


def ship(modules, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["ship_campaign.py", *args])
    try:
        modules["ship_campaign"].main()
    except SystemExit as stop:
        return 1 if stop.code else 0, capsys.readouterr().err + (str(stop.code) if stop.code else "")
    return 0, capsys.readouterr().err


def test_campaign_models_ship_with_cards_and_never_silently_replace(env, modules, monkeypatch, capsys):  # noqa: F811
    campaign = env / "campaign"
    campaign.mkdir()
    source = float_run(campaign, seed=3)
    out = env / "out"
    run_benchmark(spec(env, methods=["fp", "qmambair", "lsq"], bits=[2], fp_from=str(source), bench=[],
                       only=["qmambair-w2a2", "lsq-w2a2"]))
    runs = out / "runs"
    dest = env / "weights"
    args = ["--scale", "4", "--float", str(source), "--qat", str(runs / "qmambair-w2a2"),
            "--qat", str(runs / "lsq-w2a2"), "--dest", str(dest), "--machine", f"{campaign}=a test machine"]
    code, err = ship(modules, monkeypatch, capsys, *args)
    assert code == 0, err
    fp = dest / "light-sr-x4-fp.safetensors"
    assert fp.read_bytes() == source.read_bytes()
    card = (dest / "light-sr-x4-fp.md").read_text()
    assert "31.250 dB / 0.8500 (bicubic 30.000 dB / 0.8000)" in card  # the validation of the shipped step
    assert "the weights of step 300" in card and "400 iterations" in card and "HR patches 128 px" in card
    assert "| wall time | 16.0 min (this stage) |" in card and "a test machine; 1 torch thread(s)" in card
    for method in ("qmambair", "lsq"):
        packed = dest / f"light-sr-x4-{method}-w2a2.qmb"
        shipped = load_model(packed).eval()
        trained = load_model(runs / f"{method}-w2a2" / "model.safetensors").eval()
        x = torch.rand(1, 3, 12, 12)
        with torch.no_grad():
            assert torch.equal(shipped(x), trained(x))
        qcard = (dest / f"light-sr-x4-{method}-w2a2.md").read_text()
        log = [json.loads(line) for line in (runs / f"{method}-w2a2" / "log.jsonl").read_text().splitlines()]
        val = [e for e in log if e["event"] == "val"][-1]
        assert f"{val['psnr']:.3f} dB" in qcard and "2 iterations" in qcard
        assert f"{packed.stat().st_size / fp.stat().st_size:.3f}× the float32 file" in qcard
        assert "CPU " in qcard  # the trainer records the machine in the log

    assert "| starts from | random init |" in card
    start = "`hand.safetensors`: a start made by hand"
    code, err = ship(modules, monkeypatch, capsys, *args, "--float-start", start, "--overwrite")
    assert code == 0, err
    assert f"| starts from | {start} |" in (dest / "light-sr-x4-fp.md").read_text()

    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    code, err = ship(modules, monkeypatch, capsys, *args)
    assert code == 1 and "exists; pass --overwrite" in err and len(err.strip().splitlines()) == 1
    (env / "other").mkdir()
    other = float_run(env / "other", seed=4)
    qat = ["--qat", str(runs / "qmambair-w2a2")]
    code, err = ship(modules, monkeypatch, capsys, "--scale", "4", "--float", str(other), *qat, "--dest",
                     str(dest), "--overwrite")
    assert code == 1 and "differ" in err
    shutil.copytree(runs / "qmambair-w2a2", runs / "copy")
    code, err = ship(modules, monkeypatch, capsys, "--scale", "4", "--float", str(source), *qat, "--qat",
                     str(runs / "copy"), "--dest", str(dest), "--overwrite")
    assert code == 1 and "one name" in err
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
