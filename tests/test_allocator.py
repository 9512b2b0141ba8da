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
