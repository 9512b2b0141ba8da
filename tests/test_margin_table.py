"""The campaign's summary statistics over seeds (``benchmarks/margin_table.py --across-seeds``)."""

from __future__ import annotations

import math

import pytest

from .benchmark_scripts import benchmark_scripts


@pytest.fixture(scope="module")
def margin_table():
    with benchmark_scripts("margin_table") as scripts:
        yield scripts["margin_table"]


def _row(set_name: str, q: float, lsq: float) -> dict:
    return dict(set=set_name, qmambair=q, lsq=lsq)


def test_over_seeds_the_margin_is_paired_with_a_student_t_interval(margin_table):
    # three seeds whose differences are 0.1, 0.2, 0.3 dB: mean 0.2, std 0.1, t(0.975, 2 dof) = 4.303
    rows = [_row("builtin", 29.6, 29.5), _row("builtin", 29.4, 29.2), _row("builtin", 29.8, 29.5),
            _row("pool", 39.0, 39.0)]
    builtin, pool = margin_table.across_seeds(rows)
    assert builtin["seeds"] == 3 and pool["seeds"] == 1
    assert builtin["qmambair"] == pytest.approx(29.6) and builtin["qmambair_sd"] == pytest.approx(0.2)
    assert builtin["lsq"] == pytest.approx(29.4) and builtin["lsq_sd"] == pytest.approx(math.sqrt(0.03))
    assert builtin["margin"] == pytest.approx(0.2)
    assert builtin["ci"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert pool["margin"] == 0.0 and math.isnan(pool["ci"]) and math.isnan(pool["qmambair_sd"])
    text = margin_table.seeds_table([builtin, pool])
    assert "| builtin | 3 | 29.600 ± 0.200 | 29.400 ± 0.173 | +0.200 ± 0.248 |" in text


def test_student_t_quantiles_are_conservative_between_table_entries(margin_table):
    assert margin_table.t95(2) == 4.303
    assert margin_table.t95(11) == 2.228  # the value at 10 degrees of freedom, a little wider than at 11
    assert margin_table.t95(1000) == 1.96
