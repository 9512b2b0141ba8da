"""A run killed with SIGKILL and resumed ends with exactly the weights of an uninterrupted run (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .test_datasets import make_folder

# The CLI with the training commands registered (independent of whether cli.py lists them yet).
RUNNER = (
    "import sys; from qmambair import cli; "
    "from qmambair.commands.train import add_qat_parser, add_train_parser; "
    "cli.register_command(add_train_parser); cli.register_command(add_qat_parser); sys.exit(cli.main())"
)
TINY = ["--set", "model.embed_dim=12", "--set", "model.depths=[1]", "--set", "model.d_state=2"]


def run_cli(args: list[str], fault_step: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "QMAMBAIR_SCAN": "cpu", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "NUMBA_NUM_THREADS": "1"}  # one thread: fast on a busy machine, same arithmetic in every run
    env.pop("QMAMBAIR_FAULT_SIGKILL_STEP", None)
    if fault_step is not None:
        env["QMAMBAIR_FAULT_SIGKILL_STEP"] = str(fault_step)
    return subprocess.run([sys.executable, "-c", RUNNER, *args], env=env, capture_output=True, text=True,
                          timeout=300)


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = torch.load(a / "last.pt", weights_only=True), torch.load(b / "last.pt", weights_only=True)
    assert ca["step"] == cb["step"]
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ca["scheduler"]["last_epoch"] == cb["scheduler"]["last_epoch"]
    assert ca["metrics"]["best_psnr"] == cb["metrics"]["best_psnr"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("resume") / "images", n=4, size=40)


def test_sigkill_then_resume_is_bit_exact(data, tmp_path):
    common = ["train", "--preset", "light-sr-x2", "--data", str(data), "--iters", "8", "--batch", "2",
              "--patch", "16", "--save-every", "2", "--val-every", "3", "--seed", "3", "-q",
              "--set", "lr_cache=", *TINY]
    ref = run_cli([*common, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "killed"
    killed = run_cli([*common, "--out", str(run)], fault_step=5)  # dies in step 6, after last.pt of step 4
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4
    assert not (run / "model.safetensors").exists()

    resumed = run_cli(["train", "--out", str(run), "--resume", "-q"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "ref", run)
    events = [json.loads(line)["event"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert events.count("resume") == 1 and events[-1] == "end"

    # QAT from the float run, killed mid-run and resumed: quantizer state must continue exactly too
    qat = ["qat", "--from", str(tmp_path / "ref" / "last.pt"), "--bits", "4", "--data", str(data),
           "--iters", "5", "--batch", "2", "--patch", "16", "--save-every", "2", "--val-every", "5", "-q",
           "--set", "lr_cache="]
    assert run_cli([*qat, "--out", str(tmp_path / "qref")]).returncode == 0
    assert run_cli([*qat, "--out", str(tmp_path / "qkill")], fault_step=3).returncode == -signal.SIGKILL
    resumed = run_cli(["qat", "--out", str(tmp_path / "qkill"), "--resume", "-q"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "qref", tmp_path / "qkill")
    ckpt = torch.load(tmp_path / "qkill" / "last.pt", weights_only=True)
    assert ckpt["quant_config"]["method"] == "qmambair" and ckpt["quant_config"]["w_bits"] == 4
    assert all(bool(v) for k, v in ckpt["model"].items() if k.endswith(".initialized"))


def test_training_checkpoint_loads_as_model(data, tmp_path):
    from qmambair.loading import load_model
    from qmambair.train import TrainConfig, train

    out = tmp_path / "run"
    cfg = TrainConfig(preset="light-sr-x2", model={"embed_dim": 12, "depths": [1], "d_state": 2},
                      data=str(data), iters=2, batch=2, patch=16, val_data="none", out=str(out), lr_cache="")
    train(cfg, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):  # a run folder is never overwritten
        train(cfg, progress=False)
    model = load_model(out / "last.pt")
    assert not model.training and model.config["embed_dim"] == 12 and model.preset == "light-sr-x2"
    sd = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    same = load_model(out / "model.safetensors")
    assert all(torch.equal(v, sd[k]) for k, v in same.state_dict().items())


def test_qat_with_distillation_and_clipping(data, tmp_path):
    from qmambair.loading import load_model
    from qmambair.train import TrainConfig, train

    float_run = tmp_path / "fp"
    tiny = {"embed_dim": 12, "depths": [1], "d_state": 2}
    common = dict(data=str(data), batch=2, patch=16, val_data="none", lr_cache="")
    train(TrainConfig(preset="light-sr-x2", model=tiny, iters=2, out=str(float_run), **common),
          progress=False)
    out = tmp_path / "qat"  # the preset (default light-sr-x4) follows the float model: x2
    qat = TrainConfig(init=str(float_run / "last.pt"), quant={"method": "lsq", "bits": 2}, distill=0.5,
                      grad_clip=0.5, iters=3, out=str(out), **common)
    result = train(qat, progress=False)
    assert result["step"] == 3
    model = load_model(out / "model.safetensors")
    assert model.quant_config.method == "lsq" and model.quant_config.w_bits == 2
    assert model.preset == "light-sr-x2" and model.config["embed_dim"] == 12
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(e["grad_norm"] >= 0 for e in events if e["event"] == "train")


def test_set_threads_one_leaves_torch_at_one_thread_after_numba_starts():
    # starting numba's OpenMP layer resets torch's thread count once torch has read it (the training CLI
    # does): set_threads must survive that. A fresh process (numba not started), the machine's defaults.
    code = (
        "import torch; torch.get_num_threads(); "
        "from qmambair.train.trainer import set_threads; set_threads(1); import numba; "
        "print(torch.get_num_threads(), numba.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]
