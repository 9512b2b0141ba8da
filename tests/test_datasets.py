"""Datasets, the photo-pool helpers and the trainer's handling of bad data and of a diverging loss."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from qmambair.data import bicubic_lr, write_image
from qmambair.data.datasets import (
    Degradation,
    EvalImages,
    PatchDataset,
    SkippedImageWarning,
    StepBatchSampler,
    find_pairs,
    holdout_split,
    load_samples,
)


@pytest.fixture(autouse=True)
def _fast_scan(monkeypatch):
    """Training tests use the fused CPU scan; monkeypatch restores the environment afterwards."""
    monkeypatch.setenv("QMAMBAIR_SCAN", "cpu")

TINY = {"embed_dim": 12, "depths": [1], "d_state": 2}


def smooth_image(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """A random but natural-ish image: low-frequency colour blobs plus a little texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, channels))
    for c in range(channels):
        for _ in range(3):
            fy, fx, ph = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 6)
            img[:, :, c] += np.sin(fy * y * 6 + ph) * np.cos(fx * x * 6)
    img += 0.1 * rng.standard_normal(img.shape)
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


def make_folder(root: Path, n: int = 4, size: int = 48) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_image(root / f"img{i}.png", smooth_image(size, size + 8, seed=i))
    return root


# ----------------------------------------------------------------------------------------- datasets


def test_patch_sizes_and_determinism(tmp_path):
    folder = make_folder(tmp_path / "d")
    for deg, chans in [(Degradation("bicubic", scale=2), 3), (Degradation("bicubic", scale=3), 3),
                       (Degradation("noise", sigma=25), 3), (Degradation("jpeg", quality=20), 1)]:
        samples, skipped = load_samples(find_pairs(folder, deg.factor), deg, chans, min_size=24)
        assert len(samples) == 4 and not skipped
        ds = PatchDataset(samples, deg, hr_patch=24, seed=5)
        lq, hr = ds[7]
        p = 24 // deg.factor
        assert lq.shape == (chans, p, p) and hr.shape == (chans, 24, 24)
        assert lq.dtype == hr.dtype == torch.float32
        lq2, hr2 = PatchDataset(samples, deg, hr_patch=24, seed=5)[7]
        assert torch.equal(lq, lq2) and torch.equal(hr, hr2)
        if deg.kind == "noise":
            assert (lq - hr).std() > 0.05  # sigma 25/255 ~ 0.098
    # each pass over the sample indices visits every image once
    assert sorted(ds.image_index(i) for i in range(4, 8)) == [0, 1, 2, 3]


def test_bicubic_patch_matches_whole_image_lr(tmp_path):
    folder = make_folder(tmp_path / "d", n=1)
    deg = Degradation("bicubic", scale=2)
    samples, _ = load_samples(find_pairs(folder, 2), deg, 3)
    hr_full = samples[0].hr.astype(np.float32) / 255
    assert np.array_equal(samples[0].lq, np.round(bicubic_lr(hr_full, 2) * 255).astype(np.uint8))
    lq, hr = PatchDataset(samples, deg, 16, augment=False)[3]
    # the patch pair is aligned: find the HR patch in the image, the LR patch sits at half the offset
    hr_np = (hr.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    ys, xs = np.nonzero(np.all(samples[0].hr[:, :, 0:1] == hr_np[0, 0, 0], axis=2))
    found = [(y, x) for y, x in zip(ys, xs, strict=True)
             if np.array_equal(samples[0].hr[y : y + 16, x : x + 16], hr_np)]
    y, x = found[0]
    lq_np = (lq.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    assert np.array_equal(samples[0].lq[y // 2 : y // 2 + 8, x // 2 : x // 2 + 8], lq_np)


def test_bad_files_are_skipped_with_a_named_warning(tmp_path):
    folder = make_folder(tmp_path / "d", n=2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    write_image(folder / "tiny.png", smooth_image(10, 10, 1))
    write_image(folder / "grey.png", smooth_image(48, 48, 2, channels=1))
    with pytest.warns(SkippedImageWarning) as record:
        samples, skipped = load_samples(find_pairs(folder, 2), Degradation("bicubic", 2), 3, min_size=24)
    text = " ".join(str(w.message) for w in record)
    assert "broken.png" in text and "tiny.png" in text
    assert {Path(p).name for p, _ in skipped} == {"broken.png", "tiny.png"}
    grey = next(s for s in samples if s.name == "grey")
    assert grey.hr.shape[2] == 3 and np.array_equal(grey.hr[..., 0], grey.hr[..., 2])
    samples1, _ = load_samples([folder / "img0.png"], Degradation("jpeg", quality=30), 1)
    assert samples1[0].hr.shape[2] == 1 and samples1[0].lq.shape == samples1[0].hr.shape


def test_benchmark_and_div2k_layouts(tmp_path):
    hr = smooth_image(40, 44, 3)
    lr = np.full((20, 22, 3), 0.5, np.float32)  # deliberately not bicubic: the file must be used
    bench = tmp_path / "Set5"
    write_image(bench / "HR" / "bird.png", hr)
    write_image(bench / "LR_bicubic" / "X2" / "birdx2.png", lr)
    div2k = tmp_path / "DIV2K"
    write_image(div2k / "DIV2K_train_HR" / "0001.png", hr)
    write_image(div2k / "DIV2K_train_LR_bicubic" / "X2" / "0001x2.png", lr)
    write_image(div2k / "DIV2K_train_HR" / "0002.png", hr)  # no LR file: made with bicubic
    deg = Degradation("bicubic", scale=2)
    for root in (bench, div2k, div2k / "DIV2K_train_HR"):
        pairs = find_pairs(root, 2)
        assert pairs[0][1] is not None and pairs[0][1].name.endswith("x2.png")
        samples, _ = load_samples(pairs, deg, 3)
        assert np.all(samples[0].lq == 128)
    assert find_pairs(div2k, 2)[1][1] is None
    assert find_pairs(bench, 4)[0][1] is None  # no X4 folder: bicubic on the fly
    write_image(bench / "LR_bicubic" / "X2" / "birdx2.png", lr[:10])  # wrong size: warn and use bicubic
    with pytest.warns(SkippedImageWarning, match="birdx2.png"):
        samples, _ = load_samples(find_pairs(bench, 2), deg, 3)
    assert samples[0].lq.shape == (20, 22, 3) and not np.all(samples[0].lq == 128)


def test_eval_images_centre_crop_and_noise(tmp_path):
    folder = make_folder(tmp_path / "d", n=1, size=60)
    samples, _ = load_samples(find_pairs(folder, 3), Degradation("bicubic", scale=3), 3)
    name, lq, hr = EvalImages(samples, Degradation("bicubic", scale=3), crop=30)[0]
    assert name == "img0" and hr.shape == (3, 30, 30) and lq.shape == (3, 10, 10)
    deg = Degradation("noise", sigma=15)
    samples, _ = load_samples(find_pairs(folder, 1), deg, 3)
    a, b = EvalImages(samples, deg)[0][1], EvalImages(samples, deg)[0][1]
    assert torch.equal(a, b) and a.shape == (3, 60, 68)  # seeded per image: the same noise every time


def test_sampler_shards_and_workers_agree(tmp_path):
    single = list(StepBatchSampler(6, total_steps=4, start_step=1))
    ranks = [list(StepBatchSampler(6, total_steps=4, start_step=1, rank=r, world=2)) for r in range(2)]
    assert len(single) == 3 and all(sorted(a + b) == s for a, b, s in zip(*ranks, single, strict=True))
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(5, 3, world=2)
    folder = make_folder(tmp_path / "d")
    deg = Degradation("noise", sigma=10)
    ds = PatchDataset(load_samples(find_pairs(folder), deg, 3)[0], deg, 16, seed=1)
    batches = [list(DataLoader(ds, batch_sampler=StepBatchSampler(4, 3), num_workers=w)) for w in (0, 2)]
    for (a_lq, a_hr), (b_lq, b_hr) in zip(*batches, strict=True):
        assert torch.equal(a_lq, b_lq) and torch.equal(a_hr, b_hr)


def test_holdout_split_is_fixed():
    items = [f"im{i}" for i in range(20)]
    train, val = holdout_split(items, 0.1, seed=0)
    assert len(val) == 2 and set(train) | set(val) == set(items) and not set(train) & set(val)
    assert holdout_split(items, 0.1, seed=0) == (train, val)
    assert holdout_split(["a"], 0.5) == (["a"], [])


# ----------------------------------------------------------------------------------------- photo pool


def test_photo_pool_rules(tmp_path, monkeypatch):
    from qmambair.data import photos

    assert len(photos.PHOTOS) == 47 and len({p.name for p in photos.PHOTOS}) == 47
    assert len(photos.PACKAGES) == 6
    test = [p.name for p in photos.PHOTOS if photos.split_of(p.name) == "test"]
    assert len(test) == 6 and "libjxl-flower" in test
    assert photos.clean_size(2448, 4352) == ((1224, 2176), 2.0)
    assert photos.clean_size(3391, 6028) == ((1131, 2010), 3.0)  # MATLAB: ceil(size / 3)
    assert photos.clean_size(1600, 2560) == ((1200, 1920), 1600 / 1200)  # no integer factor fits
    assert photos.clean_size(1200, 1920)[1] == 1.0 and photos.clean_size(1512, 2268, lossless=True)[1] == 1.0
    monkeypatch.setenv("QMAMBAIR_CACHE", str(tmp_path / "cache"))
    assert photos.photos_dir() == tmp_path / "cache" / "photos"
    with pytest.raises(photos.PhotosNotFetchedError, match="qmambair data fetch"):
        photos.photo_paths("train")
    root = photos.photos_dir()
    write_image(root / "a.png", smooth_image(8, 8, 0))
    (root / "manifest.json").write_text(json.dumps({"photos": [
        {"name": "a", "file": "a.png", "split": "test"}, {"name": "b", "file": "b.png", "split": "train"}]}))
    assert photos.photo_paths("test") == [root / "a.png"]
    with pytest.raises(photos.PhotosNotFetchedError, match="b.png"):
        photos.photo_paths("all")


def test_deb_reader_without_dpkg(tmp_path, monkeypatch):
    """The pure-Python .deb reader (used where dpkg-deb is missing) extracts the wanted members."""
    import io
    import tarfile

    from qmambair.data import photos

    payload = b"hello"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        info = tarfile.TarInfo("./usr/share/x/pic.jpg")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    members = [(b"debian-binary", b"2.0\n"), (b"data.tar.xz", buf.getvalue())]
    ar = b"!<arch>\n" + b"".join(
        name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        + str(len(data)).encode().ljust(10) + b"`\n" + data + (b"\n" if len(data) % 2 else b"")
        for name, data in members)
    deb = tmp_path / "pkg_1.0_all.deb"
    deb.write_bytes(ar)
    monkeypatch.setattr(photos.shutil, "which", lambda name: None)
    photos._extract(deb, tmp_path / "tree", {"usr/share/x/pic.jpg"})
    assert (tmp_path / "tree" / "usr/share/x/pic.jpg").read_bytes() == payload
    with pytest.raises(RuntimeError, match="apt-get download"):
        photos._download(["pkg"], tmp_path, print)


# ----------------------------------------------------------------------------------------- trainer


def _config(data: Path, out: Path, **kw):
    from qmambair.train import TrainConfig

    base = dict(preset="light-sr-x2", model=TINY, data=str(data), iters=4, batch=2, patch=16,
                save_every=2, val_every=2, log_every=1, out=str(out), lr_cache="")
    base.update(kw)
    return TrainConfig(**base)


def test_training_survives_bad_files(tmp_path):
    from qmambair.train import train

    folder = make_folder(tmp_path / "d", n=3)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    write_image(folder / "small.png", smooth_image(10, 10, 1))
    write_image(folder / "grey.png", smooth_image(40, 40, 2, channels=1))
    with pytest.warns(SkippedImageWarning) as record:
        result = train(_config(folder, tmp_path / "run", val_data="none"), progress=False)
    text = " ".join(str(w.message) for w in record)
    assert "corrupt.jpg" in text and "small.png" in text
    assert result["step"] == 4
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {Path(e["path"]).name for e in events if e["event"] == "skipped"} == {"corrupt.jpg", "small.png"}
    assert next(e for e in events if e["event"] == "start")["train_images"] == 4  # 3 RGB + the grey one
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    from qmambair.train import TrainingDiverged, load_checkpoint, train, trainer

    folder = make_folder(tmp_path / "d", n=3)
    calls = {"n": 0}
    real = trainer.restoration_loss

    def poisoned(out, target):
        calls["n"] += 1
        loss = real(out, target)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(trainer, "restoration_loss", poisoned)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainingDiverged, match="last good checkpoint") as info:
            train(_config(folder, out, iters=6), progress=False)
    assert "last.pt" in str(info.value) and "step 4" in str(info.value)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not list(out.glob(".*.tmp")) and not (out / "model.safetensors").exists()
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["event"] == "diverged"


def test_validation_counts_non_finite_outputs_instead_of_failing(tmp_path):
    from qmambair.train.validate import evaluate

    folder = make_folder(tmp_path / "d", n=3, size=48)
    deg = Degradation("bicubic", scale=2)
    samples, _ = load_samples(find_pairs(folder, 2), deg, 3)
    images = EvalImages(samples, deg)

    class Upsample(torch.nn.Module):  # nearest ×2; with ``poison``, one inf pixel in the first output
        def __init__(self, poison: bool):
            super().__init__()
            self.calls = 0 if poison else 1

        def forward(self, x):
            y = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            if self.calls == 0:
                y[..., 3, 3] = float("inf")
            self.calls += 1
            return y

    good = evaluate(Upsample(False), images, baseline=True)
    assert np.isfinite(good["psnr"]) and "nonfinite" not in good and good["n"] == 3
    bad = evaluate(Upsample(True), images, baseline=True)
    assert np.isnan(bad["psnr"]) and np.isnan(bad["ssim"]) and bad["nonfinite"] == 1 and bad["n"] == 3
    assert bad["psnr_base"] == good["psnr_base"]  # the baseline is still measured
