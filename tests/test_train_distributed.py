"""Two processes (torchrun, gloo, localhost) doing QAT end with identical weights and quantizer state,
equal to what rank 0 saved; only rank 0 writes the log. Two processes at global batch B compute the same
gradients and weights as one process at batch B (the gradient reduction is a mean over the global batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from .test_datasets import make_folder

WORKER = textwrap.dedent('''
    import os, sys, torch
    from qmambair.train import TrainConfig, Trainer
    cfg = TrainConfig(**eval(sys.argv[1]))
    trainer = Trainer(cfg, progress=False)
    result = trainer.fit()
    rank = trainer.info.rank
    torch.save({"state": trainer.model.state_dict(), "result": result, "world": trainer.info.world},
               os.path.join(sys.argv[2], f"rank{rank}.pt"))
    trainer.close()
''')


def test_two_process_qat_is_consistent(tmp_path):
    from qmambair.loading import load_model
    from qmambair.models import build_model
    from qmambair.models.checkpoint import save_model
    from qmambair.quant import QuantConfig, quantize_model, quantizer_state_keys

    data = make_folder(tmp_path / "images", n=4, size=40)
    torch.manual_seed(0)
    tiny = {"embed_dim": 12, "depths": [1], "d_state": 2}
    save_model(build_model("light-sr-x2", **tiny), tmp_path / "float.safetensors")
    out = tmp_path / "run"
    cfg = dict(preset="light-sr-x2", init=str(tmp_path / "float.safetensors"), quant={"method": "qmambair",
               "bits": 4}, data=str(data), iters=4, batch=4, patch=16, save_every=2, val_every=2, log_every=1,
               out=str(out), lr_cache="", val_fraction=0.25)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "QMAMBAIR_SCAN": "cpu", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), repr(cfg), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    s0, s1 = r0["state"], r1["state"]
    assert s0.keys() == s1.keys()
    quant_keys = quantizer_state_keys(quantize_model(build_model("light-sr-x2", **tiny), QuantConfig(bits=4)))
    assert len(quant_keys) > 50 and quant_keys <= s0.keys()  # every quantizer's state is compared below
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    assert all(bool(v) for k, v in s0.items() if k.endswith("initialized"))
    assert r0["result"]["psnr"] == r1["result"]["psnr"]  # validation is all-reduced

    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["step"] == 4 and len(saved["rng"]) == 2
    for key in s0:
        assert torch.equal(saved["model"][key], s0[key]), key
    exported = load_model(out / "model.safetensors").state_dict()
    assert all(torch.equal(exported[k], s0[k]) for k in s0)

    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("end") == 1 and kinds.count("checkpoint") == 2
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]  # one writer, no duplicates
    start = events[kinds.index("start")]
    assert start["world"] == 2 and start["local_batch"] == 2
    last_val = [e for e in events if e["event"] == "val"][-1]
    assert last_val["psnr"] == r0["result"]["psnr"]


GRAD_WORKER = textwrap.dedent('''
    import os, sys, torch
    from qmambair.train import TrainConfig, Trainer
    cfg = TrainConfig(**eval(sys.argv[1]))
    trainer = Trainer(cfg, progress=False)
    first = {}

    def keep_first_gradients(optimizer, args, kwargs):
        if not first:
            first.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
                          if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(keep_first_gradients)
    trainer.fit()
    torch.save({"state": trainer.model.state_dict(), "grads": first, "world": trainer.info.world},
               os.path.join(sys.argv[2], f"{sys.argv[3]}-rank{trainer.info.rank}.pt"))
    trainer.close()
''')


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max() + 1e-9)


def test_two_processes_equal_one_process_at_the_same_global_batch(tmp_path):
    """Float training (Adam, no gradient clipping), global batch 4: torchrun with 2 processes (2 samples each)
    against one process (4 samples). The first step's gradients must agree to float rounding (a sum instead
    of a mean over ranks doubles them; no reduction makes them differ), and so must the weights after 3
    steps."""
    from qmambair.loading import load_model
    from qmambair.models import build_model
    from qmambair.models.checkpoint import save_model

    data = make_folder(tmp_path / "images", n=4, size=40)
    torch.manual_seed(0)
    tiny = {"embed_dim": 12, "depths": [1], "d_state": 2}
    save_model(build_model("light-sr-x2", **tiny), tmp_path / "float.safetensors")
    (tmp_path / "worker.py").write_text(GRAD_WORKER)
    env = {**os.environ, "QMAMBAIR_SCAN": "cpu", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    for tag, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                "--nproc_per_node", "2"])):
        cfg = dict(preset="light-sr-x2", init=str(tmp_path / "float.safetensors"), data=str(data), iters=3,
                   batch=4, patch=16, save_every=3, val_every=3, log_every=1, out=str(tmp_path / tag),
                   lr_cache="", val_fraction=0.25, grad_clip=0.0, lr=1e-3)
        cmd = [sys.executable, *launcher, str(tmp_path / "worker.py"), repr(cfg), str(tmp_path), tag]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    one = torch.load(tmp_path / "one-rank0.pt", weights_only=True)
    two = [torch.load(tmp_path / f"two-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert one["world"] == 1 and two[0]["world"] == two[1]["world"] == 2
    grads = one["grads"]
    n_params = len(dict(build_model("light-sr-x2", **tiny).named_parameters()))
    assert len(grads) == n_params  # every parameter got a gradient
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    for run in two:
        assert run["grads"].keys() == grads.keys()
        for name, g in grads.items():
            assert _close(run["grads"][name], g, 1e-4), (name, float((run["grads"][name] / g).nanmean()))
        for key, value in one["state"].items():
            if value.is_floating_point():
                assert _close(run["state"][key], value, 1e-4), key
            else:
                assert torch.equal(run["state"][key], value), key
    initial = load_model(tmp_path / "float.safetensors").state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in one["state"].items())  # the 3 steps moved weights
