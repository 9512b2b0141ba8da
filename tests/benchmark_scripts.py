"""Load scripts from benchmarks/ as modules for a test, and leave sys.path and sys.modules as they were."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_scripts(*names: str) -> Iterator[dict[str, ModuleType]]:
    """``benchmarks/<name>.py`` for each name, as modules (name -> module) while the block runs.

    benchmarks/ is on sys.path meanwhile (scripts import each other), and each module is in sys.modules
    (dataclasses look their module up there); both are undone afterwards, including the modules the
    scripts imported from benchmarks/ themselves.
    """
    before = set(sys.modules)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        loaded = {}
        for name in names:
            spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            loaded[name] = module
        yield loaded
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None)
            if file and Path(file).parent == BENCHMARKS:
                del sys.modules[name]
