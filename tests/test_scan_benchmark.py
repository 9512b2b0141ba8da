"""benchmarks/scan.py --interleaved --tile-ab: the 'cpu-tile64' case really runs with forward tiles of 64."""

from __future__ import annotations

import pytest

from .benchmark_scripts import benchmark_scripts

pytest.importorskip("numba")


def test_tile_ab_times_the_cpu_kernel_with_tiles_of_64_and_puts_the_tile_back(monkeypatch, capsys):
    import torch

    from qmambair.scan import cpu as scan_cpu

    threads = torch.get_num_threads()  # the benchmark sets its own; the other tests keep theirs

    seen = []
    real_tile = scan_cpu._tile

    def spy(chunk: int) -> int:
        seen.append(real_tile(chunk))
        return seen[-1]

    monkeypatch.setattr(scan_cpu, "_tile", spy)
    with benchmark_scripts("scan") as scripts:
        bench = scripts["scan"]
        monkeypatch.setitem(bench.SHAPES, "tiny", (1, 2, 3, 4, 300))
        try:
            bench.interleaved("tiny", 2, 1, ("ref", "cpu", "cpu-tile64"), ref_repeats=1)
        finally:
            torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|")[1].strip() for line in lines if line.startswith("| ")]
    assert rows[1:] == ["ref", "cpu", "cpu-tile64"]
    assert set(seen) == {scan_cpu.TILE, 64} and scan_cpu.TILE == 256  # both sizes ran; the module's is back


def test_state_sweep_times_each_number_of_states(monkeypatch, capsys):
    import numba
    import torch

    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    with benchmark_scripts("scan") as scripts:
        bench = scripts["scan"]
        monkeypatch.setitem(bench.SHAPES, "tiny", (1, 2, 3, 99, 300))
        try:
            med = bench.state_sweep("tiny", 2, 1, states=(1, 3))
        finally:
            torch.set_num_threads(threads)
            numba.set_num_threads(numba_threads)
    assert set(med) == {1, 3} and all(v > 0 for v in med.values())
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r[1].strip() for r in rows[1:]] == ["1", "3"]
    per_update = [float(r[4]) for r in rows[1:]]
    per_item = [float(r[3]) for r in rows[1:]]
    assert per_update[0] == pytest.approx(per_item[0], abs=0.006)  # one state: the same quantity
    assert per_update[1] * 3 == pytest.approx(per_item[1], abs=0.02)
