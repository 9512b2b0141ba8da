"""benchmarks/deploy_speed.py: the ONNX node counts (an exported tiny model, counted against the graph file
itself) and their table."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch

from .benchmark_scripts import benchmark_scripts

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def deploy_speed():
    with benchmark_scripts("deploy_speed") as scripts:
        yield scripts["deploy_speed"]


def test_node_counts_are_those_of_the_optimised_graph(deploy_speed, tmp_path):
    from qmambair.export_onnx import export_onnx
    from qmambair.models import build_model

    torch.manual_seed(0)
    model = build_model("light-sr-x2", embed_dim=12, depths=[1], d_state=2).eval()
    path = export_onnx(model, tmp_path / "tiny.onnx", tile=8)
    counts = deploy_speed.onnx_node_counts(path, threads=1)
    written = onnx.load(str(tmp_path / "tiny-optimized.onnx")).graph.node
    assert counts == Counter(node.op_type for node in written)
    exported = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert counts != exported  # onnxruntime rewrote the graph (fused LayerNorm, dropped Identity/Constant)


def test_node_table_lists_the_largest_differences_first(deploy_speed):
    counts = {"onnx-float": Counter(Mul=5, Add=3, Conv=2), "onnx-qdq": Counter(Mul=9, Add=3, Conv=2, Round=1)}
    lines = deploy_speed.node_table(counts, most=2)
    assert lines[0] == "| nodes after onnxruntime's optimisation | onnx-float | onnx-qdq |"
    assert lines[2] == "| all | 10 | 15 |"
    assert lines[3:] == ["| Mul | 5 | 9 |", "| Round | 0 | 1 |"]
