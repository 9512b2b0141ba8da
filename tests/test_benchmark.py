"""``qmambair benchmark``: each method x bits trained or calibrated once, evaluated, reported; reruns skip."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qmambair import cli
from qmambair.data.builtin import builtin_images
from qmambair.data.io import write_image
from qmambair.experiments.benchmark import BenchmarkSpec, run_benchmark
from qmambair.loading import load_model

TINY = {"embed_dim": 8, "depths": [1], "d_state": 4}
TINY_SETS = ["--set", "model.embed_dim=8", "--set", "model.depths=[1]", "--set", "model.d_state=4"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Small real photos: a training folder (one image is held out for test) and two benchmark layouts."""
    monkeypatch.setenv("QMAMBAIR_SCAN", "cpu")
    monkeypatch.setenv("QMAMBAIR_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    photos = builtin_images(["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "retina"])
    crops = [img[img.shape[0] // 2 - 24 :, img.shape[1] // 2 - 24 :][:48, :48] for img in photos.values()]
    for i, crop in enumerate(crops[:5]):
        write_image(tmp_path / "train" / f"p{i}.png", crop)
    for i, crop in enumerate(crops[4:]):  # Set5-style pack whose LR files are flat grey, and a plain folder
        write_image(tmp_path / "bench" / "Tiny" / "HR" / f"t{i}.png", crop[:40, :40])
        write_image(
            tmp_path / "bench" / "Tiny" / "LR_bicubic" / "X4" / f"t{i}x4.png",
            np.full((10, 10, 3), 0.5, np.float32),
        )
        write_image(tmp_path / "plain" / f"t{i}.png", crop[:40, :40])
    numba = pytest.importorskip("numba")
    numba_threads = numba.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)  # the benchmark's threads=1 must not leak into other tests
    numba.set_num_threads(numba_threads)


def spec(root: Path, **kw) -> BenchmarkSpec:
    base = dict(
        methods=["fp", "qmambair", "minmax"],
        bits=[4, 2],
        iters=2,
        data=str(root / "train"),
        bench=[str(root / "bench"), str(root / "plain")],
        out=str(root / "out"),
        batch=2,
        patch=32,
        threads=1,
        model=TINY,
        calib_patches=4,
    )
    return BenchmarkSpec(**{**base, **kw})


def snapshot(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out / "runs")): p.read_bytes()
        for p in sorted((out / "runs").rglob("*"))
        if p.name in ("log.jsonl", "eval.json", "model.safetensors")
    }


def events(run: Path) -> list[str]:
    return [json.loads(line)["event"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_benchmark_runs_reports_and_resumes(env, capsys):
    out = env / "out"
    rows = run_benchmark(spec(env))
    pairs = {(r["method"], r["bits"]) for r in rows}
    quantized = {(m, b) for m in ("qmambair", "minmax") for b in (4, 2)}
    assert pairs == {("bicubic", None), ("fp", None)} | quantized
    for r in rows:
        for name in ("test", "Tiny", "plain"):
            assert math.isfinite(r[f"psnr_{name}"]) and 0 < r[f"ssim_{name}"] <= 1, (r["method"], name)
    bicubic = rows[0]
    assert bicubic["method"] == "bicubic" and bicubic["psnr_plain"] > 25
    assert bicubic["psnr_Tiny"] < bicubic["psnr_plain"] - 5  # the pack's own (flat) LR files were used
    with open(out / "results.csv") as f:
        assert [(r["method"], r["bits"]) for r in csv.DictReader(f)] == [
            (r["method"], "" if r["bits"] is None else str(r["bits"])) for r in rows
        ]
    md = (out / "results.md").read_text()
    for text in (
        "seed: 0",
        "batch 2",
        "HR patch 32",
        "2 iterations",
        "machine: CPU",
        "torch thread",
        "| minmax | W2A2 |",
        "Tiny PSNR",
        "4 calibration patches",
    ):
        assert text in md, text
    assert "ablation" not in md.lower()
    try:
        import matplotlib  # noqa: F401

        assert (out / "psnr_vs_bits.png").stat().st_size > 1000
    except ImportError:
        pass

    # second call through the CLI, adding a method and the ablation at W4A4: only the new runs train
    before = snapshot(out)
    argv = [
        "benchmark",
        "--methods",
        "fp,qmambair,lsq,minmax",
        "--bits",
        "4,2",
        "--iters",
        "2",
        "--data",
        str(env / "train"),
        "--bench",
        str(env / "bench"),
        "--bench",
        str(env / "plain"),
        "--out",
        str(out),
        "--batch",
        "2",
        "--patch",
        "32",
        "--threads",
        "1",
        "--calib",
        "4",
        "--ablation-bits",
        "4",
        "-q",
        *TINY_SETS,
    ]
    assert cli.main(argv) == 0
    assert "| lsq | W4A4 |" in capsys.readouterr().out
    after = snapshot(out)
    assert {k: after[k] for k in before} == before  # nothing trained, calibrated or evaluated again
    new = {k.split("/")[0] for k in set(after) - set(before)}
    assert new == {"lsq-w4a4", "lsq-w2a2", "ablation-base-w4a4", "ablation-dls-w4a4", "ablation-rfa-w4a4"}
    cfg = load_model(out / "runs" / "ablation-base-w4a4" / "model.safetensors").quant_config
    assert (cfg.method, cfg.w_bits, cfg.use_dls, cfg.use_rfa) == ("qmambair", 4, False, False)
    assert "+DLS +RFA (Q-MambaIR)" in (out / "results.md").read_text()

    # an interrupted run (no final model, no end event) resumes from last.pt instead of starting over
    run = out / "runs" / "lsq-w2a2"
    (run / "model.safetensors").unlink()
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["event"] != "end"))
    before = snapshot(out)
    rows = run_benchmark(spec(env, methods=["fp", "qmambair", "lsq", "minmax"], ablation_bits=[4]))
    assert len(rows) == 2 + 3 * 2 + 3
    assert events(run).count("start") == 1 and events(run)[-2:] == ["resume", "end"]
    assert (run / "model.safetensors").exists()
    after = snapshot(out)
    # only that run changed: its log, and its numbers (re-evaluated because its model file is new)
    assert [k for k in before if after.get(k) != before[k]] == ["lsq-w2a2/eval.json", "lsq-w2a2/log.jsonl"]

    # the same folder with other settings is refused, naming what differs
    with pytest.raises(ValueError, match="seed"):
        run_benchmark(spec(env, seed=1))


def test_benchmark_rejects_bad_methods_and_bits(capsys):
    assert cli.main(["benchmark", "--methods", "fp,lsq,fancy", "--iters", "2"]) == 1
    err = capsys.readouterr().err
    assert "unknown method 'fancy'" in err and "percentile" in err
    assert cli.main(["benchmark", "--bits", "4,5"]) == 1
    assert "unsupported bit-width(s) [5]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["benchmark", "--bits", "four"])
    assert cli.main(["benchmark", "--set", "colour=1"]) == 1
    assert "unknown benchmark option(s) ['colour']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="x2, not x4"):
        BenchmarkSpec(preset="light-sr-x2", scale=4)
    aliases = BenchmarkSpec(methods=["LSQPlus", "q-mambair", "lsq+"], preset="light-sr-x3")
    assert aliases.methods == ["lsq+", "qmambair"]
    assert BenchmarkSpec(preset="light-sr-x3").scale == 3


def test_benchmark_from_an_existing_float_model(env):
    from qmambair.models.checkpoint import save_model
    from qmambair.models.presets import build_model

    torch.manual_seed(3)
    source = save_model(build_model("light-sr-x4", **TINY), env / "float.safetensors")
    s = spec(env, methods=["fp", "qmambair"], bits=[2], fp_from=str(source), bench=[])
    rows = run_benchmark(s)
    fp_dir = env / "out" / "runs" / "fp"
    assert not (fp_dir / "log.jsonl").exists()  # no float training: the given model is used as it is
    adopted, original = load_model(fp_dir / "model.safetensors"), load_model(source)
    pairs = zip(adopted.state_dict().values(), original.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    start = next(json.loads(line) for line in (env / "out" / "runs" / "qmambair-w2a2" / "log.jsonl")
                 .read_text().splitlines() if json.loads(line)["event"] == "start")
    assert Path(start["config"]["init"]) == fp_dir / "model.safetensors"
    assert [r["method"] for r in rows] == ["bicubic", "fp", "qmambair"]
    assert f"float model `{source}`" in (env / "out" / "results.md").read_text()
    torch.manual_seed(4)
    other = save_model(build_model("light-sr-x4", **TINY), env / "other.safetensors")
    with pytest.raises(ValueError, match="another float model"):
        run_benchmark(spec(env, methods=["fp", "qmambair"], bits=[2], fp_from=str(other), bench=[]))
    with pytest.raises(ValueError, match="does not exist"):
        spec(env, fp_from=str(env / "missing.safetensors"))


def test_benchmark_only_trains_the_named_runs_and_a_run_in_use_is_refused(env):
    from qmambair.errors import UserError
    from qmambair.fileio import exclusive_folder
    from qmambair.models.checkpoint import save_model
    from qmambair.models.presets import build_model

    torch.manual_seed(3)
    source = save_model(build_model("light-sr-x4", **TINY), env / "float.safetensors")
    runs = env / "out" / "runs"
    s = dict(methods=["fp", "qmambair", "lsq"], bits=[2], fp_from=str(source), bench=[], save_every=1)
    assert run_benchmark(spec(env, only=["lsq-w2a2"], **s)) == []  # trained, not evaluated
    assert (runs / "lsq-w2a2" / "model.safetensors").exists() and not (runs / "qmambair-w2a2").exists()
    assert not (runs / "lsq-w2a2" / "eval.json").exists() and not (env / "out" / "results.md").exists()
    start = json.loads((runs / "lsq-w2a2" / "log.jsonl").read_text().splitlines()[0])
    assert start["config"]["save_every"] == 1
    with pytest.raises(ValueError, match="no run named lsq-w4a4.*qmambair-w2a2, lsq-w2a2"):
        spec(env, only=["lsq-w4a4"], **s)
    with exclusive_folder(runs / "qmambair-w2a2", "training"):  # as if another process trained it now
        with pytest.raises(UserError, match="in use by another training"):
            run_benchmark(spec(env, **s))
    assert not (runs / "qmambair-w2a2" / "log.jsonl").exists()
    rows = run_benchmark(spec(env, **s))  # the last call without only: trains the rest, reports everything
    assert [r["method"] for r in rows] == ["bicubic", "fp", "qmambair", "lsq"]
    assert "| lsq | W2A2 |" in (env / "out" / "results.md").read_text()
