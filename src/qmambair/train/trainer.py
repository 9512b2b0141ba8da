"""One training loop for full precision and QAT (docs/method.md §5).

L1 loss to the ground truth (plus, optionally, ``distill`` x L1 to the float teacher's output); Adam, lr 2e-4,
betas (0.9, 0.99), no weight decay; MultiStepLR halving at 50/75/87.5/93.75 % of the run; optional gradient
clipping. QAT quantizers initialise on the first batch, are broadcast from rank 0, then DDP wraps the model.

The run folder holds ``log.jsonl`` (one JSON object per event), ``last.pt`` (every ``save_every`` steps and at
the end; ``--resume`` continues from it exactly: same weights as an uninterrupted run on the same machine),
``best.pt`` (best validation PSNR) and ``model.safetensors`` (final weights, for ``qmambair restore``).
A non-finite loss or gradient stops the run (:class:`TrainingDiverged`) without touching the checkpoints.

Fault injection for tests: ``QMAMBAIR_FAULT_SIGKILL_STEP=N`` makes the process SIGKILL itself in the middle
of step N (0-based; after the backward pass, before the optimiser step).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.datasets import (
    Degradation,
    EvalImages,
    PatchDataset,
    StepBatchSampler,
    find_pairs,
    holdout_split,
    load_samples,
    min_eval_size,
)
from ..fileio import exclusive_folder
from . import distributed as D
from .checkpoint import (
    atomic_save,
    load_checkpoint,
    load_model_file,
    model_from_training_checkpoint,
    rng_state,
    set_rng_state,
    training_checkpoint,
)
from .config import RUNTIME_KEYS, TrainConfig
from .machine import describe_machine
from .validate import evaluate

__all__ = ["Trainer", "TrainingDiverged", "restoration_loss", "set_threads", "train"]

FAULT_ENV = "QMAMBAIR_FAULT_SIGKILL_STEP"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the message names the last good checkpoint."""


def restoration_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss: mean absolute error (L1)."""
    return F.l1_loss(output, target)


class JsonlLog:
    """Appends one JSON object per event to ``path`` (only where ``enabled``: rank 0)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, event: str, **fields: Any) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads in torch and in the numba scan kernels.

    On small shared machines, fewer threads than cores can be much faster: with 2 vCPUs and another busy
    process, 2 OpenMP threads made a training step 3-60x slower than 1 thread (spin-waiting for a descheduled
    thread). ``torchrun`` already sets OMP_NUM_THREADS=1 per process.

    numba goes first: once torch has read its thread count, starting numba's OpenMP threading layer (which
    ``numba.set_num_threads`` does) resets torch's intra-op count to the number of cores, so setting torch
    first silently gave 2 threads instead of 1 (two such trainings side by side on 2 cores ran 5-10x
    slower per step).
    """
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    torch.set_num_threads(n)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_float(path: str) -> nn.Module:
    """The model an ``init``/``teacher`` entry names (eval mode): any file ``qmambair.load_model`` reads, a
    shipped model or a preset name."""
    from ..models.checkpoint import locate_model_file
    from ..models.presets import build_model

    p = locate_model_file(path)
    return build_model(path).eval() if p is None else load_model_file(p)


def build_datasets(
    cfg: TrainConfig, deg: Degradation, channels: int
) -> tuple[PatchDataset, EvalImages | None, list[tuple[str, str]]]:
    """Training patches, validation images (or None) and the skipped files, as ``cfg`` describes."""
    from ..data.photos import cache_root, photo_paths

    cache = None
    if cfg.lr_cache:
        cache = cache_root() / "lr" if cfg.lr_cache == "auto" else Path(cfg.lr_cache)
    builtin = cfg.data in ("", "builtin")
    if builtin:
        train_items: list[Any] = photo_paths("train")
        val_items: list[Any] = photo_paths("test")
    else:
        train_items, val_items = find_pairs(cfg.data, deg.factor), []
    if cfg.val_data.lower() == "none":
        val_items = []
    elif cfg.val_data:
        val_items = find_pairs(cfg.val_data, deg.factor)
    elif not builtin:
        train_items, val_items = holdout_split(train_items, cfg.val_fraction, cfg.seed)
    if cfg.val_images:
        val_items = val_items[: cfg.val_images]
    samples, skipped = load_samples(train_items, deg, channels, min_size=cfg.patch, cache_dir=cache)
    if not samples:
        why = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
        raise ValueError(f"no usable training images in {cfg.data or 'builtin'} ({why or 'none found'})")
    val_samples, val_skipped = load_samples(val_items, deg, channels, min_eval_size(deg), cache_dir=cache)
    train_set = PatchDataset(samples, deg, cfg.patch, seed=cfg.seed, augment=cfg.augment,
                             min_std=cfg.patch_min_std)
    val_set = EvalImages(val_samples, deg, crop=cfg.val_crop) if val_samples else None
    return train_set, val_set, skipped + val_skipped


class Trainer:
    """Sets up model, data, optimiser and process group from a :class:`TrainConfig`; :meth:`fit` trains.

    ``resume=True`` continues the run in ``config.out`` from ``last.pt`` with the configuration stored there
    (only ``workers``, ``device`` and ``out`` are taken from ``config``).
    """

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True):
        cfg = config.resolved()
        self.out = Path(cfg.out)
        ckpt = None
        if resume:
            ckpt = load_checkpoint(self.out / "last.pt")
            saved = TrainConfig.from_dict(ckpt["config"])
            for key in RUNTIME_KEYS:
                setattr(saved, key, getattr(cfg, key))
            cfg = saved
        elif (self.out / "last.pt").exists():
            raise FileExistsError(f"{self.out} already holds a run (last.pt): pass --resume to continue it, "
                                  "or choose another --out")
        self._scan_env = os.environ.get("QMAMBAIR_SCAN")  # restored by close()
        if cfg.scan:
            os.environ["QMAMBAIR_SCAN"] = cfg.scan
        if cfg.threads > 0:
            set_threads(cfg.threads)
        self.cfg, self.progress = cfg, progress
        self.info = D.setup(cfg.device)
        self._owns_group = self.info.distributed
        self.log = JsonlLog(self.out / "log.jsonl", self.info.is_main)

        _seed_all(cfg.seed)  # identical initial weights on every rank
        self.model, self.teacher = self._build_model(ckpt)
        from ..models.presets import get_preset

        spec = {**get_preset(cfg.preset).get("degradation", {}), **cfg.degradation}
        self.deg = Degradation.from_dict(spec)
        if getattr(self.model, "upscale", 1) != self.deg.factor:
            raise ValueError(f"the model upscales x{self.model.upscale} but the degradation is {self.deg}; "
                             "choose a matching --preset or --set degradation.scale=...")
        if not self.info.is_main:
            D.barrier()  # rank 0 reads the images first and fills the LR cache
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.train_set, self.val_set, skipped = build_datasets(cfg, self.deg, self.model.in_chans)
        finally:
            if self.info.is_main:
                D.barrier()  # also on failure: the other ranks then fail the same way instead of hanging
        if self.info.is_main:
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            for path, reason in skipped:
                self.log.write("skipped", path=path, reason=reason)

        self.model.to(self.info.device).train()
        if self.teacher is not None:
            self.teacher.to(self.info.device).eval().requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        betas = (cfg.betas[0], cfg.betas[1])
        # fused: one kernel for all tensors; a quantized model has ~3x the float model's (tiny) parameter
        # tensors, and the per-tensor Adam loop cost more than its fake quantizers (benchmarks/quant_speed.py)
        fused = self.info.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay,
                                          fused=fused or None)
        steps = sorted({max(1, round(f * cfg.iters)) for f in cfg.milestones})
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, steps, gamma=cfg.gamma)
        self.step, self.metrics = 0, {"best_psnr": None, "best_step": None}
        _seed_all(cfg.seed + 1000 * (self.info.rank + 1))  # per-rank streams (drop-path)
        if ckpt is not None:
            self._restore(ckpt)

    # ----------------------------------------------------------------------------------------- setup

    def _build_model(self, ckpt: dict | None) -> tuple[nn.Module, nn.Module | None]:
        cfg = self.cfg
        teacher = None
        if cfg.distill > 0:
            source = cfg.teacher or cfg.init
            if not source:
                raise ValueError("distillation (distill > 0) needs a float teacher: --set teacher=FILE")
            teacher = _load_float(source)
        if ckpt is not None:
            return model_from_training_checkpoint(ckpt), teacher
        if cfg.init:
            model = _load_float(cfg.init)
            if cfg.model:
                warnings.warn(f"model overrides {cfg.model} ignored: the architecture comes from {cfg.init}",
                              stacklevel=3)
            if getattr(model, "quant_config", None) is not None and cfg.quant:
                raise ValueError(f"{cfg.init} is already quantized; QAT starts from a full-precision model")
            model.preset = model.preset or cfg.preset
            if model.preset != cfg.preset:
                self.cfg.preset = model.preset
        else:
            from ..models.presets import build_model

            model = build_model(cfg.preset, **cfg.model)
            if cfg.interp_init:
                from ..models.init import init_as_interpolation

                init_as_interpolation(model)
        if cfg.quant:
            from ..quant.convert import QuantConfig, quantize_model

            model = quantize_model(model, QuantConfig(**cfg.quant))
        return model, teacher

    def _restore(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        self.metrics.update(ckpt.get("metrics", {}))
        states = ckpt.get("rng", [])
        if len(states) == self.info.world:
            set_rng_state(states[self.info.rank])
        else:
            warnings.warn(f"checkpoint was written by {len(states)} process(es), this run has "
                          f"{self.info.world}: random streams restart, the continuation is not bit-exact",
                          stacklevel=3)
        self.log.write("resume", step=self.step, machine=describe_machine(str(self.info.device)))

    # -------------------------------------------------------------------------------------- actions

    def save(self) -> None:
        """Write ``last.pt`` (collective: every rank must call it)."""
        rng = D.all_gather_object(rng_state())
        if self.info.is_main:
            obj = training_checkpoint(D.unwrap(self.model), self.cfg.to_dict(), self.step, self.optimizer,
                                      self.scheduler, rng, self.metrics)
            atomic_save(obj, self.out / "last.pt")
            self.log.write("checkpoint", step=self.step, path=str(self.out / "last.pt"))

    def validate(self) -> dict[str, float] | None:
        """Validate (collective), keep ``best.pt`` up to date, log; None without validation images."""
        if self.val_set is None:
            return None
        first = "psnr_base" not in self.metrics
        result = evaluate(D.unwrap(self.model), self.val_set, self.info, self.cfg.val_tile, baseline=first)
        if first:
            self.metrics.update(psnr_base=result["psnr_base"], ssim_base=result["ssim_base"])
        self.metrics.update(psnr=result["psnr"], ssim=result["ssim"], val_step=self.step)
        best = self.metrics.get("best_psnr")
        if math.isfinite(result["psnr"]) and (best is None or result["psnr"] > best):
            self.metrics.update(best_psnr=result["psnr"], best_ssim=result["ssim"], best_step=self.step)
            if self.info.is_main:
                atomic_save(training_checkpoint(D.unwrap(self.model), self.cfg.to_dict(), self.step,
                                                metrics=self.metrics), self.out / "best.pt")
        base = {k: self.metrics.get(k) for k in ("psnr_base", "ssim_base")}
        self.log.write("val", step=self.step, **{**result, **base})
        return result

    def _diverged(self, what: str, value: float) -> TrainingDiverged:
        last = self.out / "last.pt"
        where = "no checkpoint was written yet"
        if last.exists():
            step = load_checkpoint(last)["step"]
            where = f"the last good checkpoint is {last} (step {step}), left untouched"
        self.log.write("diverged", step=self.step, what=what, value=str(value))
        return TrainingDiverged(
            f"{what} became {value} at step {self.step + 1}: training stopped; {where}. Restart from it "
            f"with a lower learning rate or gradient clipping, e.g. --set init={last} "
            f"--set lr={self.cfg.lr / 4:g} --set grad_clip=1.0 --out NEW_RUN")

    def fit(self) -> dict[str, Any]:
        """Train until ``iters`` steps; returns the final metrics (with ``step`` and ``seconds``)."""
        cfg, info = self.cfg, self.info
        local = cfg.batch // info.world
        sampler = StepBatchSampler(cfg.batch, cfg.iters, self.step, info.rank, info.world)
        loader = DataLoader(self.train_set, batch_sampler=sampler, num_workers=cfg.workers,
                            pin_memory=info.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed))  # global RNG left alone
        batches = iter(loader)
        if self.step == 0:
            self.log.write("start", config=cfg.to_dict(), world=info.world, device=str(info.device),
                           machine=describe_machine(str(info.device)),
                           train_images=len(self.train_set), val_images=len(self.val_set or []),
                           degradation=str(self.deg), local_batch=local)
        if cfg.quant and self.step == 0:
            from ..quant.calibrate import initialize_quantizers

            first = next(batches)
            initialize_quantizers(self.model, first[0])  # rank 0's state is broadcast to all ranks
            batches = itertools.chain([first], batches)
        model = D.wrap(self.model, info)
        fault = int(os.environ.get(FAULT_ENV, "-1"))
        bar = tqdm(total=cfg.iters, initial=self.step, disable=not (self.progress and info.is_main),
                   desc="QAT" if cfg.quant else "train", unit="it", dynamic_ncols=True)
        started, window_t, window_loss, window_n = time.perf_counter(), time.perf_counter(), 0.0, 0
        try:
            for lq, hr in batches:
                lq, hr = lq.to(info.device, non_blocking=True), hr.to(info.device, non_blocking=True)
                out = model(lq)
                loss = restoration_loss(out, hr)
                if self.teacher is not None:
                    with torch.no_grad():
                        target = self.teacher(lq)
                    loss = loss + cfg.distill * F.l1_loss(out, target)
                # summed on the loss's device (nccl reduces CUDA tensors only); the same value on every rank
                mean_loss = D.all_reduce_sum(loss.detach().double().reshape(1)).item() / info.world
                if not np.isfinite(mean_loss):
                    raise self._diverged("the loss", mean_loss)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.step == fault:
                    os.kill(os.getpid(), signal.SIGKILL)
                params = [p for p in self.model.parameters() if p.grad is not None]
                norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                if not torch.isfinite(norm):
                    raise self._diverged("the gradient norm", norm.item())
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                window_loss, window_n = window_loss + mean_loss, window_n + 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.iters:
                    now = time.perf_counter()
                    rate = window_n / max(now - window_t, 1e-9)
                    lr = self.optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{window_loss / window_n:.4f}", lr=f"{lr:.2e}")
                    self.log.write("train", step=self.step, loss=window_loss / window_n, lr=lr,
                                   grad_norm=norm.item(), it_s=rate, eta_s=(cfg.iters - self.step) / rate,
                                   elapsed_s=now - started)
                    window_t, window_loss, window_n = now, 0.0, 0
                if self.step % cfg.val_every == 0 or self.step == cfg.iters:
                    result = self.validate()
                    if result is not None and info.is_main:
                        bar.write(f"step {self.step}: PSNR {result['psnr']:.3f} dB, "
                                  f"SSIM {result['ssim']:.4f} (baseline {self.metrics['psnr_base']:.3f} dB)")
                if self.step % cfg.save_every == 0 or self.step == cfg.iters:
                    self.save()
        finally:
            bar.close()
        if self.step == cfg.iters and info.is_main:
            from ..models.checkpoint import save_model

            save_model(D.unwrap(self.model), self.out / "model.safetensors")
        seconds = time.perf_counter() - started
        self.log.write("end", step=self.step, seconds=seconds, **self.metrics)
        return {"step": self.step, "seconds": seconds, **self.metrics}

    def close(self) -> None:
        """Leave the process group if this trainer joined it; restore the scan-backend setting."""
        if self._owns_group:
            D.cleanup()
        if self._scan_env is None:
            os.environ.pop("QMAMBAIR_SCAN", None)
        else:
            os.environ["QMAMBAIR_SCAN"] = self._scan_env


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Build a :class:`Trainer`, run it and clean up; returns the final metrics. The run folder is claimed
    for the whole run (by rank 0 under torchrun), so a second process training into it stops with an error
    instead of writing over the same checkpoints."""
    main_rank = os.environ.get("RANK", "0") == "0"
    with exclusive_folder(config.resolved().out, "training") if main_rank else nullcontext():
        trainer = Trainer(config, resume=resume, progress=progress)
        try:
            return trainer.fit()
        finally:
            trainer.close()

