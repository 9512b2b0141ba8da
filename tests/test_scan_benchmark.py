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
