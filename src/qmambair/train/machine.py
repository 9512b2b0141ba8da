"""The machine a run or a measurement ran on, as one line for logs, model cards and results tables."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def describe_machine(device: str | None = None) -> str:
    """CPU model (and GPU name when ``device`` is CUDA), torch threads and version, for results tables."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    gpu = f"; GPU {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else "; no GPU"
    return f"CPU {cpu}, {torch.get_num_threads()} torch thread(s){gpu}; torch {torch.__version__}"
