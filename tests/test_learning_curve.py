"""benchmarks/learning_curve.py: the log fit and its extrapolation, checked against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .benchmark_scripts import benchmark_scripts


@pytest.fixture(scope="module")
def learning_curve():
    with benchmark_scripts("learning_curve") as scripts:
        yield scripts["learning_curve"]


def _run(tmp_path: Path, gains: dict[int, float], seconds_per_step: float = 2.0) -> Path:
    base = 40.0
    events = [{"event": "train", "step": 10, "it_s": 1 / seconds_per_step}]
    events += [{"event": "val", "step": s, "psnr": base + g, "psnr_base": base, "n": 6}
               for s, g in gains.items()]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return tmp_path


def test_extrapolates_a_rising_curve(tmp_path, learning_curve):
    # the points lie exactly on gain = 0.5 + 0.25·log10(step)
    run = _run(tmp_path, {10: 0.75, 100: 1.0, 1000: 1.25})
    text = learning_curve.report(run, target=1.5, init_psnr=None)
    assert "Fit: gain = +0.500 +0.250·log10(step) dB." in text
    assert "+1.50 dB at step ≈ 10,000 (≈ 5.6 h" in text  # 10**((1.5-0.5)/0.25) steps × 2 s


def test_a_target_beyond_reach_is_said_so_not_given_a_step(tmp_path, learning_curve):
    run = _run(tmp_path, {250: 0.90, 500: 0.91, 1000: 0.92})
    text = learning_curve.report(run, target=1.6, init_psnr=None)
    assert "does not reach +1.60 dB within 100× the steps so far (1,000)" in text
    assert "Extrapolated" not in text


@pytest.mark.parametrize("gains", [{250: 0.9, 500: 0.8}, {250: 0.9}])
def test_no_extrapolation_from_a_flat_or_single_point_curve(tmp_path, gains, learning_curve):
    text = learning_curve.report(_run(tmp_path, gains), target=1.6, init_psnr=None)
    assert "Extrapolated" not in text and "does not reach" not in text
