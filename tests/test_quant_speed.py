"""benchmarks/quant_speed.py: the spread over processes (--runs, checked against hand-computed ratios) and the
inference cases' weight cache."""

from __future__ import annotations

import argparse

import pytest

from .benchmark_scripts import benchmark_scripts


@pytest.fixture(scope="module")
def quant_speed():
    with benchmark_scripts("quant_speed") as scripts:
        yield scripts["quant_speed"]


def _row(text: str, name: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_each_run_is_divided_by_its_own_float_time(quant_speed):
    # run 1: float median 100 ms, lsq median 150 ms -> 1.50; run 2: float 200, lsq 220 -> 1.10;
    # run 3: float 50, lsq 60 -> 1.20. Ratio of the medians over runs would be 150/100 = 1.50 instead.
    runs = [
        {"float": [0.1, 0.09, 0.2], "lsq": [0.15, 0.14, 0.3]},
        {"float": [0.2, 0.2, 0.2], "lsq": [0.22, 0.1, 0.5]},
        {"float": [0.05, 0.05, 0.06], "lsq": [0.06, 0.06, 0.07]},
    ]
    text = quant_speed.runs_table("inference", runs)
    assert "median of 3 runs" in text
    assert _row(text, "float") == ["float", "100.0", "1.00", "1.00", "1.00"]
    assert _row(text, "lsq") == ["lsq", "150.0", "1.20", "1.10", "1.50"]


def test_inference_cases_keep_their_weight_cache_across_training_steps(quant_speed):
    # A deployed model quantizes its weights once; the interleaved training steps (train(), Adam) must not
    # make every timed inference call quantize them again.
    from qmambair.quant.base import WeightQuantizer

    args = argparse.Namespace(scale=4, bits=2, batch=1, lr_size=8, infer_size=8, methods="fp,lsq",
                              quant_kernels="fused", packed="", load_quant_ab=False, denormals_ab=False,
                              levels_ab=False)
    train_cases, infer_cases = quant_speed.build_cases(args)
    infer = infer_cases["lsq (fused)"]
    model = infer.__defaults__[0]
    infer()
    cached = [m._cached[1] for m in model.modules() if isinstance(m, WeightQuantizer)]
    assert cached and all(t is not None for t in cached)
    train_cases["lsq (fused)"]()
    infer()
    again = [m._cached[1] for m in model.modules() if isinstance(m, WeightQuantizer)]
    assert all(a is b for a, b in zip(cached, again, strict=True))
    assert model is not train_cases["lsq (fused)"].__defaults__[0]


def test_levels_ab_times_each_quantized_case_with_the_decays_computed(quant_speed):
    pytest.importorskip("numba")
    from qmambair.scan import cpu as scan_cpu

    args = argparse.Namespace(scale=4, bits=2, batch=1, lr_size=8, infer_size=8, methods="fp,lsq",
                              quant_kernels="fused", packed="", load_quant_ab=False, denormals_ab=False,
                              levels_ab=True)
    train_cases, infer_cases = quant_speed.build_cases(args)
    assert list(infer_cases) == ["float", "lsq (fused)", "lsq (fused), decays computed"]
    infer_cases["lsq (fused)"]()
    looked, tiles = scan_cpu.decay_lookups()["forward"]
    assert looked == tiles > 0
    infer_cases["lsq (fused), decays computed"]()
    assert scan_cpu.decay_lookups()["forward"][0] == 0
    infer_cases["lsq (fused)"]()  # the A/B variant put QScan back as it was
    assert scan_cpu.decay_lookups()["forward"][0] > 0


def test_packed_models_are_timed_in_fake_quant_and_in_int8(quant_speed):
    """Each shipped .qmb is timed as loaded (fused fake quantizers) and in integer inference, the mode
    ``qmambair restore`` runs: every quantized layer of that copy has its int8 forward switched on."""
    pytest.importorskip("numba")
    from qmambair.quant import QConv2d, QLinear
    from qmambair.quant.layers import QProjection

    args = argparse.Namespace(scale=4, bits=2, batch=1, lr_size=8, infer_size=8, methods="fp",
                              quant_kernels="fused", packed="4", load_quant_ab=False, denormals_ab=False,
                              levels_ab=False)
    _, infer_cases = quant_speed.build_cases(args)
    names = [f"light-sr-x4-{m}-w4a4.qmb" for m in ("qmambair", "lsq")]
    expected = ["float"] + [f"{n} ({mode})" for n in names for mode in ("fused", "int8, restore's default")]
    assert list(infer_cases) == expected
    fake, integer = (infer_cases[expected[i]].__defaults__[0] for i in (1, 2))
    assert fake is not integer

    def layers(model):
        return [m for m in model.modules() if isinstance(m, QConv2d | QLinear | QProjection)]

    assert layers(integer) and all("forward" in m.__dict__ for m in layers(integer))
    assert not any("forward" in m.__dict__ for m in layers(fake))
    for case in expected:
        infer_cases[case]()
