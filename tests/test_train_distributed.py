"""Two processes (torchrun, gloo, localhost) doing QAT end with identical weights and quantizer state,
equal to what rank 0 saved; only rank 0 writes the log."""

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
