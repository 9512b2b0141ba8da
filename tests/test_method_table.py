"""The campaign's method table (``benchmarks/method_table.py``): rows, differences to float, arguments."""

from __future__ import annotations

import math

import pytest

from .benchmark_scripts import benchmark_scripts


@pytest.fixture(scope="module")
def method_table():
    with benchmark_scripts("method_table") as scripts:
        yield scripts["method_table"]


def test_each_model_is_compared_with_the_float_model_image_by_image(method_table):
    scores = {
        "bicubic": {"@builtin": [28.0, 30.0, 29.0], "@pool": [38.0, 37.0]},
        "float": {"@builtin": [29.0, 31.0, 30.5], "@pool": [39.0, 38.0]},
        "W2A2": {"@builtin": [28.9, 30.8, 30.2], "@pool": [38.5, 37.9]},
    }
    rows = method_table.rows_for(scores, "float")
    assert [r["label"] for r in rows] == ["bicubic", "float", "W2A2"]
    w2 = rows[2]
    assert w2["builtin"] == pytest.approx((28.9 + 30.8 + 30.2) / 3)
    # differences -0.1, -0.2, -0.3: mean -0.2, std 0.1, t(0.975, 2) = 4.303
    assert w2["builtin_diff"][0] == pytest.approx(-0.2)
    assert w2["builtin_diff"][1] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert w2["pool_diff"][0] == pytest.approx(-0.3)
    assert rows[1]["builtin_diff"] is None
    text = method_table.table(rows)
    assert "| float | 30.167 | — | 38.500 | — |" in text
    # pool differences -0.5, -0.1: std 0.2828, t(0.975, 1) = 12.706, half-width 12.706 · 0.2828 / √2 = 2.541
    assert "| W2A2 | 29.967 | -0.200 ± 0.248 | 38.200 | -0.300 ± 2.541 |" in text
    assert "builtin (3 images)" in text and "pool (2 images)" in text


def test_a_model_argument_without_a_label_or_file_is_one_clear_error(method_table, tmp_path):
    with pytest.raises(SystemExit, match="LABEL=PATH"):
        method_table.parse_model("runs/x")
    with pytest.raises(SystemExit, match="does not exist"):
        method_table.parse_model(f"x={tmp_path}")  # a folder without model.safetensors


def test_a_model_with_nan_or_inf_outputs_is_reported_as_diverging(method_table):
    scores = {
        "float": {"@builtin": [29.0, 31.0], "@pool": [39.0, 38.0]},
        "unstable": {"@builtin": [28.5, math.nan], "@pool": [38.9, 37.8]},  # NaN: score_test_set's NaN/inf
    }
    rows = method_table.rows_for(scores, "float")
    assert rows[1]["builtin_nonfinite"] == 1 and rows[1]["builtin_diff"] is None
    assert rows[1]["pool_diff"][0] == pytest.approx(-0.15)
    text = method_table.table(rows)
    assert "| unstable | diverges (NaN/inf output on 1 of 2 images) | — | 38.350 | -0.150 ± " in text
