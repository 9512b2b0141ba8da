"""benchmarks/transplant_body.py: a model of one scale started from another scale's body."""

from __future__ import annotations

import pytest
import torch

from qmambair.loading import load_model
from qmambair.models.checkpoint import save_model
from qmambair.models.presets import build_model

from .benchmark_scripts import benchmark_scripts
from .test_benchmark import TINY


@pytest.fixture(scope="module")
def script():
    with benchmark_scripts("transplant_body") as scripts:
        yield scripts["transplant_body"]


def _model(scale: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(f"light-sr-x{scale}", **TINY)


def test_body_from_one_model_upsampler_from_the_other(script, tmp_path):
    x4, x2 = _model(4, 0), _model(2, 1)
    save_model(x4, tmp_path / "x4.safetensors")
    save_model(x2, tmp_path / "x2.safetensors")
    out = tmp_path / "new.safetensors"
    args = ["--body", str(tmp_path / "x4.safetensors"), "--tail", str(tmp_path / "x2.safetensors")]
    assert script.main([*args, "--out", str(out)]) == 0
    new = load_model(out).state_dict()
    body, tail = x4.state_dict(), x2.state_dict()
    assert set(new) == set(tail)
    for name, tensor in new.items():
        expected = tail[name] if name.startswith("upsample.") else body[name]
        assert torch.equal(tensor, expected), name
    assert any(not torch.equal(body[n], tail[n]) for n in tail if not n.startswith("upsample."))
    sr = load_model(out)(torch.rand(1, 3, 8, 8))
    assert sr.shape == (1, 3, 16, 16)


def test_refuses_other_architectures_existing_outputs_and_its_inputs(script, tmp_path, capsys):
    save_model(_model(4, 0), tmp_path / "x4.safetensors")
    wide = build_model("light-sr-x2", **{**TINY, "embed_dim": 16})
    save_model(wide, tmp_path / "wide.safetensors")
    args = ["--body", str(tmp_path / "x4.safetensors"), "--tail", str(tmp_path / "wide.safetensors")]
    assert script.main([*args, "--out", str(tmp_path / "new.safetensors")]) == 1
    assert "not the same architecture" in capsys.readouterr().err
    assert not (tmp_path / "new.safetensors").exists()
    with pytest.raises(SystemExit):
        script.main([*args, "--out", str(tmp_path / "wide.safetensors"), "--overwrite"])
    assert "is one of the inputs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([*args, "--out", str(tmp_path / "x4.safetensors")])
    assert "exists" in capsys.readouterr().err
