"""Whether torch is recording a graph (jit tracing, torch.compile/export, the ONNX exporter).

Code with a fast path outside torch (numba kernels, in-place buffers, custom autograd Functions) must take
its plain torch-operation path then, so that the recorded graph holds ordinary operations.
"""

from __future__ import annotations

import torch


def capturing_graph() -> bool:
    """True while torch.jit traces, torch.compile/export compiles, or the ONNX exporter runs."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
