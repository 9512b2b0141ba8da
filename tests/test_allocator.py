"""keep_freed_memory(): freed tensor memory is reused instead of being page-faulted in again (glibc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qmambair.allocator import _mallopt

# Per round: allocate and write tensors of 8, 12 and 20 MB, then free them (the pattern of a network's
# activations); report the minor page faults per round over the last 10 of 20 rounds. Both modes start
# from glibc's initial thresholds held fixed (its own adaptive thresholds depend on what happened to be freed
# before, so they fault on some runs and not on others); "keep" then calls keep_freed_memory().
PROBE = """
import json, resource, sys, torch
from qmambair import allocator
assert allocator.set_thresholds(*allocator.GLIBC_INITIAL)
applied = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(20):
    if i == 10:
        start = faults()
    tensors = [torch.empty(n).fill_(1.0) for n in (2_000_000, 3_000_000, 5_000_000)]
    del tensors
print(json.dumps({"applied": applied, "faults_per_round": (faults() - start) / 10}))
"""
PAGES_PER_ROUND = 40_000_000 // 4096


def probe(mode: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout)


@pytest.mark.skipif(_mallopt() is None, reason="needs glibc")
def test_freed_tensor_memory_is_reused_instead_of_faulted_in_again():
    kept, default = probe("keep"), probe("initial")
    assert kept["applied"] and not default["applied"]
    assert default["faults_per_round"] > 0.5 * PAGES_PER_ROUND  # glibc's initial thresholds: mapped afresh
    assert kept["faults_per_round"] < 0.02 * PAGES_PER_ROUND


@pytest.mark.skipif(_mallopt() is None, reason="needs glibc")
def test_the_environment_can_keep_glibc_behaviour():
    assert probe("keep", {"QMAMBAIR_MALLOC": "default"})["applied"] is False


def test_the_command_line_applies_it(monkeypatch, capsys):
    from qmambair import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["info", "light-sr-x4-fp"]) == 0
    assert calls == [1]


def test_fresh_pages_above_sets_the_mmap_threshold_and_puts_the_last_settings_back(monkeypatch):
    from qmambair import allocator

    calls = []
    monkeypatch.setattr(allocator, "_mallopt", lambda: lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setitem(allocator._settings, "current", allocator.GLIBC_INITIAL)
    assert allocator.keep_freed_memory()
    calls.clear()
    with allocator.fresh_pages_above(64 * 1024):
        assert calls == [(allocator.M_MMAP_THRESHOLD, 64 * 1024),
                         (allocator.M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD)]
        calls.clear()
    assert calls == [(allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD),  # keep_freed_memory's again
                     (allocator.M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD)]


def test_an_onnx_export_traces_with_fresh_pages(monkeypatch, tmp_path):
    """Tracing fragments glibc's heap (many GB resident for a 64x64 MambaIR-light export): export_onnx must
    trace inside fresh_pages_above."""
    pytest.importorskip("onnx")
    import contextlib

    import torch

    from qmambair import export_onnx

    inside = []

    @contextlib.contextmanager
    def spy():
        inside.append(True)
        yield
        inside.append(False)

    real_export = torch.onnx.export
    monkeypatch.setattr(export_onnx, "fresh_pages_above", spy)
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: inside.append("export") or real_export(*a, **k))
    export_onnx.export_onnx(torch.nn.Conv2d(3, 3, 3, padding=1), tmp_path / "conv.onnx", tile=8)
    assert inside == [True, "export", False]
