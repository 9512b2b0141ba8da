"""The main job: shipped models load by name and carry model cards; ``qmambair demo`` writes a full report."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from qmambair.cli import main
from qmambair.experiments.demo import demo_models, run_demo
from qmambair.experiments.visual import side_by_side
from qmambair.loading import load_model
from qmambair.models.checkpoint import CheckpointError
from qmambair.models.shipped import list_shipped, model_card, shipped_path


@pytest.fixture(autouse=True)
def _fast_scan(monkeypatch):
    monkeypatch.setenv("QMAMBAIR_SCAN", "cpu")


def test_every_shipped_model_has_a_card_and_loads_by_name():
    names = list_shipped()
    assert "light-sr-x4-fp" in names and "light-sr-x4-qmambair-w4a4" in names
    for name in names:
        card = model_card(name)
        assert "test PSNR / SSIM" in card and "iterations" in card and "machine" in card, name
    model = load_model("light-sr-x4-qmambair-w2a2")
    assert model.quant_config.method == "qmambair" and model.quant_config.w_bits == 2
    assert shipped_path("light-sr-x4-lsq-w4a4").suffix == ".qmb"
    with pytest.raises(CheckpointError, match="shipped model"):
        load_model("light-sr-x9-fp")


def test_demo_writes_report_with_every_row(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--scales", "4", "--images", "camera,chelsea", "--crop", "48", "--out", str(out)]
    assert main(argv) == 0
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == [m.label for m in demo_models(4)]
    bicubic = rows[0]
    assert bicubic["file_bytes"] == "" and 15 < float(bicubic["psnr"]) < 40
    sizes = {r["model"]: int(r["file_bytes"]) for r in rows[1:]}
    assert sizes["Q-MambaIR W4A4"] < 0.3 * sizes["MambaIR (float)"]
    assert sizes["Q-MambaIR W2A2"] < sizes["Q-MambaIR W4A4"]
    assert all(float(r["seconds_per_image"]) > 0 for r in rows[1:])
    report = (out / "report.md").read_text()
    for row in rows:
        assert f"| {row['model']} |" in report
    html = (out / "report.html").read_text()
    assert html.count("<tr>") == len(rows) + 1 and "crops_x4_camera.png" in html
    crops = Image.open(out / "crops_x4_camera.png")
    assert crops.width > 8 * 40  # LR, bicubic, 5 models, HR side by side
    restored = Image.open(out / "images" / "x4" / "LSQ_W2A2" / "chelsea.png")
    assert restored.size == (48, 48)


def test_demo_rejects_unknown_images(tmp_path, capsys):
    assert main(["demo", "--images", "nosuchimage", "--out", str(tmp_path)]) == 1
    assert "nosuchimage" in capsys.readouterr().err


def test_run_demo_reports_missing_models(tmp_path, monkeypatch):
    import qmambair.experiments.demo as demo

    monkeypatch.setattr(demo, "list_shipped", lambda: ["light-sr-x4-fp"])
    lines: list[str] = []
    rows = run_demo(tmp_path, scales=[4], images=["camera"], crop=32, log=lines.append)
    assert [r["model"] for r in rows] == ["bicubic", "MambaIR (float)"]
    assert sum("not installed" in line for line in lines) == 4


def test_side_by_side_layout_and_errors(tmp_path):
    a = np.zeros((10, 12, 3), np.uint8)
    b = np.full((10, 12, 1), 255, np.uint8)
    path = side_by_side([("a", a), ("b", b)], tmp_path / "s.png", zoom=3, gap=2)
    img = np.asarray(Image.open(path))
    assert img.shape[1] == 2 * (36 + 2) + 2
    assert img[2 + 5, 2 + 5].tolist() == [0, 0, 0] and img[2 + 5, 2 + 38 + 5].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="one size"):
        side_by_side([("a", a), ("c", np.zeros((5, 5, 3), np.uint8))], tmp_path / "x.png")
    with pytest.raises(ValueError, match="uint8"):
        side_by_side([("a", a.astype(np.float32))], tmp_path / "x.png")


def test_info_reports_packed_file(capsys):
    assert main(["info", "light-sr-x4-lsq-w2a2", "--size", "16x16"]) == 0
    text = capsys.readouterr().out
    assert "2-bit weight codes" in text and "220 tensors" in text
    ratio = float(text.split(" x the float32")[0].rsplit("= ", 1)[1])
    assert 0.1 < ratio <= 0.25


def test_shipped_x4_models_beat_bicubic_and_w4a4_stays_near_float(tmp_path):
    # the quality checks on two held-out built-in photographs (not in the training pool)
    rows = run_demo(tmp_path, scales=[4], images=["astronaut", "chelsea"], crop=256, log=lambda _: None)
    psnr = {r["model"]: float(r["psnr"]) for r in rows}
    assert psnr["MambaIR (float)"] > psnr["bicubic"] + 0.3
    assert psnr["Q-MambaIR W4A4"] > psnr["MambaIR (float)"] - 0.5
    assert psnr["Q-MambaIR W2A2"] > psnr["bicubic"]
