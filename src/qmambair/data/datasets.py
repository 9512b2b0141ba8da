"""Training and validation data: image folders, degradations, random patches and a fixed validation split.

Layouts (docs/evaluation.md §5.3): a benchmark pack ``Set5/HR`` + ``Set5/LR_bicubic/X4/<stem>x4.png``; DIV2K
``DIV2K_train_HR/`` + ``DIV2K_train_LR_bicubic/X4/<stem>x4.png`` (pass the parent or the HR folder); or any
folder of HR images (searched recursively), whose LR is made with MATLAB bicubic after modcrop.

Every image is read, converted to the model's channels (grey <-> RGB) and degraded **once**, up front, and
kept in memory as uint8: bicubic LR (cached on disk as PNG, keyed by path, size and mtime) or the
JPEG-compressed image. Gaussian noise is drawn per patch. Unreadable or too-small images are skipped with a
:class:`SkippedImageWarning` naming them, so a long run never stops on a bad file.

Patches are a pure function of ``(seed, sample index)``: which image (a fresh permutation of the images per
pass), where to crop, which flip/rotation and which noise. :class:`StepBatchSampler` hands step ``t`` the
indices ``t*B .. t*B+B-1`` (split into contiguous per-rank shares), so a resumed or multi-process run draws
exactly the samples an uninterrupted single-process run would, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .degrade import add_gaussian_noise, bicubic_lr, jpeg_compress
from .imresize import modcrop
from .io import ImageReadError, read_image, write_image

__all__ = [
    "IMAGE_SUFFIXES",
    "Degradation",
    "Sample",
    "SkippedImageWarning",
    "list_images",
    "find_pairs",
    "holdout_split",
    "load_samples",
    "PatchDataset",
    "EvalImages",
    "StepBatchSampler",
    "min_eval_size",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


class SkippedImageWarning(UserWarning):
    """An image was left out of a dataset (unreadable, too small, mismatched LR); the message names it."""


@dataclass(frozen=True)
class Degradation:
    """How the network input is made from a clean image: ``bicubic`` (x scale), ``noise`` (sigma on the 0-255
    scale) or ``jpeg`` (quality)."""

    kind: str = "bicubic"
    scale: int = 4
    sigma: float = 0.0
    quality: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("bicubic", "noise", "jpeg"):
            raise ValueError(f"degradation type must be bicubic, noise or jpeg, got {self.kind!r}")
        if self.kind == "bicubic" and int(self.scale) < 2:
            raise ValueError(f"bicubic degradation needs scale >= 2, got {self.scale}")
        if self.kind == "jpeg" and not 1 <= int(self.quality) <= 100:
            raise ValueError(f"jpeg degradation needs quality in 1..100, got {self.quality}")

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Degradation:
        """From a preset's ``degradation`` section, e.g. ``{type: bicubic, scale: 4}``."""
        kind = spec.get("type", spec.get("kind", "bicubic"))
        return cls(kind=kind, scale=int(spec.get("scale", 4)) if kind == "bicubic" else 1,
                   sigma=float(spec.get("sigma", 0.0)), quality=int(spec.get("quality", 0)))

    @property
    def factor(self) -> int:
        """Spatial factor between input and target (1 unless super-resolution)."""
        return int(self.scale) if self.kind == "bicubic" else 1

    def __str__(self) -> str:
        return {"bicubic": f"bicubic x{self.scale}", "noise": f"Gaussian noise sigma {self.sigma:g}",
                "jpeg": f"JPEG q{self.quality}"}[self.kind]


@dataclass
class Sample:
    """One image in memory: uint8 ``HWC`` target (modcropped) and its input (None: made per patch)."""

    name: str
    hr: np.ndarray
    lq: np.ndarray | None


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden entries skipped), sorted."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _lr_file(lr_dir: Path, hr: Path, scale: int) -> Path | None:
    for name in (f"{hr.stem}x{scale}{hr.suffix}", f"{hr.stem}x{scale}.png", f"{hr.stem}{hr.suffix}"):
        if (lr_dir / name).is_file():
            return lr_dir / name
    return None


def find_pairs(root: str | os.PathLike, scale: int = 1) -> list[tuple[Path, Path | None]]:
    """``(HR file, LR file or None)`` for a dataset folder in one of the layouts of the module docstring."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (or is not a folder)")
    hr_dir, lr_dir = root, None
    if (root / "HR").is_dir():  # benchmark pack
        hr_dir, lr_dir = root / "HR", root / "LR_bicubic" / f"X{scale}"
    else:
        hr_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith("_HR"))
        if root.name.endswith("_HR"):  # DIV2K_train_HR given directly
            hr_dir, lr_dir = root, root.parent / (root.name[:-3] + "_LR_bicubic") / f"X{scale}"
        elif len(hr_dirs) == 1:
            hr_dir, lr_dir = hr_dirs[0], root / (hr_dirs[0].name[:-3] + "_LR_bicubic") / f"X{scale}"
    hr_files = list_images(hr_dir)
    if lr_dir is not None and lr_dir.is_dir():
        hr_files = [p for p in hr_files if lr_dir not in p.parents]
    if not hr_files:
        raise FileNotFoundError(f"no images (.png, .jpg, ...) found in {hr_dir}")
    use_lr = scale > 1 and lr_dir is not None and lr_dir.is_dir()
    return [(p, _lr_file(lr_dir, p, scale) if use_lr else None) for p in hr_files]


def holdout_split(items: Sequence[Any], fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """(train, val): a fixed-seed random ``fraction`` of ``items`` is held out (at least 1 of 2 or more)."""
    n = len(items)
    n_val = 0 if n < 2 or fraction <= 0 else min(n - 1, max(1, round(fraction * n)))
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [x for i, x in enumerate(items) if i not in val_idx]
    return train, [x for i, x in enumerate(items) if i in val_idx]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _cached_lr(hr_path: Path, hr8: np.ndarray, scale: int, cache_dir: Path | None) -> np.ndarray:
    """Bicubic LR of ``hr8`` (uint8), read from / written to ``cache_dir`` when given."""
    target = None
    if cache_dir is not None:
        st = hr_path.stat()
        key = f"{hr_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|x{scale}|c{hr8.shape[2]}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        target = cache_dir / f"{hr_path.stem}-{digest}-x{scale}.png"
        if target.is_file():
            try:
                lr = _to_uint8(read_image(target, mode="keep"))
                if lr.shape == (hr8.shape[0] // scale, hr8.shape[1] // scale, hr8.shape[2]):
                    return lr
            except ImageReadError:
                pass  # a damaged cache entry is simply made again
    lr = _to_uint8(bicubic_lr(hr8, scale))
    if target is not None:
        try:
            write_image(target, lr)
        except OSError as exc:
            warnings.warn(f"cannot write LR cache {target}: {exc}", stacklevel=3)
    return lr


def load_samples(
    pairs: Sequence[tuple[Path, Path | None]] | Sequence[Path],
    degradation: Degradation,
    channels: int = 3,
    min_size: int = 1,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Read and degrade images once. Returns the samples and ``(path, reason)`` of every skipped image.

    ``channels``: 3 (grey images replicated) or 1 (colour converted to luma). ``min_size``: the smaller HR
    side (after modcrop) must be at least this (e.g. the training patch). ``cache_dir``: bicubic LR cache.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = "rgb" if channels == 3 else "gray"
    s = degradation.factor
    cache = Path(cache_dir) if cache_dir else None
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []

    def skip(path: Path, reason: str) -> None:
        skipped.append((str(path), reason))
        warnings.warn(f"skipping {path}: {reason}", SkippedImageWarning, stacklevel=3)

    for item in pairs:
        hr_path, lr_path = (item, None) if isinstance(item, str | os.PathLike) else item
        hr_path = Path(hr_path)
        try:
            hr8 = modcrop(_to_uint8(read_image(hr_path, mode=mode)), s)
        except ImageReadError as exc:
            skip(hr_path, f"{exc.problem}")
            continue
        if min(hr8.shape[:2]) < max(min_size, s):
            skip(hr_path, f"{hr8.shape[0]}x{hr8.shape[1]} is smaller than the {max(min_size, s)} px needed")
            continue
        lq = None
        if degradation.kind == "bicubic":
            want = (hr8.shape[0] // s, hr8.shape[1] // s, channels)
            if lr_path is not None:
                try:
                    lq = _to_uint8(read_image(lr_path, mode=mode))
                except ImageReadError as exc:
                    warnings.warn(f"{lr_path}: {exc.problem}; making bicubic LR instead", SkippedImageWarning,
                                  stacklevel=2)
                if lq is not None and lq.shape != want:
                    msg = (f"{lr_path} is {lq.shape[1]}x{lq.shape[0]}, expected {want[1]}x{want[0]} for "
                           f"{hr_path.name}; making bicubic LR instead")
                    warnings.warn(msg, SkippedImageWarning, stacklevel=2)
                    lq = None
            if lq is None:
                lq = _cached_lr(hr_path, hr8, s, cache)
        elif degradation.kind == "jpeg":
            lq = _to_uint8(jpeg_compress(hr8, degradation.quality))
        samples.append(Sample(hr_path.stem, hr8, lq))
    return samples, skipped


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class PatchDataset(Dataset):
    """Random training patches ``(input, target)`` as float32 CHW tensors in [0,1] (noise is not clipped).

    Item ``i`` is a pure function of ``(seed, i)`` (module docstring); ``hr_patch`` is the target size and
    must be a multiple of the scale. Every index is valid: the images are cycled in a fresh order per pass.
    """

    def __init__(self, samples: Sequence[Sample], degradation: Degradation, hr_patch: int, seed: int = 0,
                 augment: bool = True, min_std: float = 0.0, tries: int = 10):
        if not samples:
            raise ValueError("PatchDataset needs at least one image")
        s = degradation.factor
        if hr_patch % s:
            raise ValueError(f"patch size {hr_patch} must be a multiple of the scale {s}")
        small = [x.name for x in samples if min(x.hr.shape[:2]) < hr_patch]
        if small:
            raise ValueError(f"images smaller than the {hr_patch} px patch: {', '.join(small[:5])}")
        self.samples = list(samples)
        self.degradation = degradation
        self.hr_patch = hr_patch
        self.seed = int(seed)
        self.augment = augment
        if min_std < 0 or tries < 1:
            raise ValueError(f"min_std must be >= 0 and tries >= 1, got {min_std}, {tries}")
        self.min_std = float(min_std)
        self.tries = int(tries)

    def __len__(self) -> int:
        """Number of images (indices beyond it are valid too: further passes)."""
        return len(self.samples)

    def image_index(self, index: int) -> int:
        """Which image sample ``index`` is cut from."""
        n = len(self.samples)
        epoch, k = divmod(int(index), n)
        return int(np.random.default_rng([self.seed, 0, epoch]).permutation(n)[k])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[self.image_index(index)]
        rng = np.random.default_rng([self.seed, 1, int(index)])
        s, p = self.degradation.factor, self.hr_patch // self.degradation.factor
        y, x = self._position(sample.hr, rng)
        hr = sample.hr[y * s : (y + p) * s, x * s : (x + p) * s]
        lq = hr if sample.lq is None else sample.lq[y : y + p, x : x + p]
        if self.augment:
            hflip, vflip, transpose = rng.random(3) < 0.5
            for flag, op in ((hflip, lambda a: a[:, ::-1]), (vflip, lambda a: a[::-1]),
                             (transpose, lambda a: a.transpose(1, 0, 2))):
                if flag:
                    hr, lq = op(hr), op(lq)
        hr_f = hr.astype(np.float32) / 255.0
        lq_f = lq.astype(np.float32) / 255.0
        if self.degradation.kind == "noise":
            lq_f = lq_f + rng.normal(0.0, self.degradation.sigma / 255.0, lq_f.shape).astype(np.float32)
        return _chw(lq_f), _chw(hr_f)


    def _position(self, hr: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        """LR top-left corner of the patch. With ``min_std`` > 0, flat patches are skipped: up to ``tries``
        random positions are drawn and the first whose HR patch has a standard deviation (in [0, 1] units,
        over all channels) of at least ``min_std`` is taken, else the busiest of them."""
        s, p = self.degradation.factor, self.hr_patch // self.degradation.factor
        h, w = hr.shape[0] // s, hr.shape[1] // s
        best, best_std = (0, 0), -1.0
        for _ in range(self.tries if self.min_std > 0 else 1):
            y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            if self.min_std <= 0:
                return y, x
            std = float(hr[y * s : (y + p) * s, x * s : (x + p) * s].std()) / 255.0
            if std >= self.min_std:
                return y, x
            if std > best_std:
                best, best_std = (y, x), std
        return best


class EvalImages(Dataset):
    """Validation items ``(name, input, target)``: whole images, or a centre crop of ``crop`` target pixels.

    Denoising inputs get the protocol's noise (generator seeded 0 per image, not clipped).
    """

    def __init__(self, samples: Sequence[Sample], degradation: Degradation, crop: int = 0):
        self.samples = list(samples)
        self.degradation = degradation
        self.crop = int(crop)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        s = self.degradation.factor
        hr, lq = sample.hr, sample.lq if sample.lq is not None else sample.hr
        if self.crop:
            ch, cw = (min(self.crop, n) // s for n in hr.shape[:2])
            y, x = (hr.shape[0] // s - ch) // 2, (hr.shape[1] // s - cw) // 2
            hr = hr[y * s : (y + ch) * s, x * s : (x + cw) * s]
            lq = lq[y : y + ch, x : x + cw] if sample.lq is not None else hr
        hr_f = hr.astype(np.float32) / 255.0
        lq_f = lq.astype(np.float32) / 255.0
        if self.degradation.kind == "noise":
            lq_f = add_gaussian_noise(hr_f, self.degradation.sigma, seed=0)
        return sample.name, _chw(lq_f), _chw(hr_f)


class StepBatchSampler(Sampler[list[int]]):
    """Batches of sample indices for steps ``start .. total-1``: step t, rank r gets a contiguous share of
    ``t*batch .. t*batch+batch-1`` (``batch`` is the total over ``world`` processes)."""

    def __init__(self, batch: int, total_steps: int, start_step: int = 0, rank: int = 0, world: int = 1):
        if batch % world:
            raise ValueError(f"batch {batch} must be divisible by the number of processes {world}")
        self.batch, self.total, self.start = int(batch), int(total_steps), int(start_step)
        self.local, self.rank = self.batch // world, int(rank)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            first = step * self.batch + self.rank * self.local
            yield list(range(first, first + self.local))

    def __len__(self) -> int:
        return max(0, self.total - self.start)


def min_eval_size(degradation: Degradation) -> int:
    """Smallest target side that leaves a valid SSIM window after the metric's border crop."""
    return 2 * degradation.factor + 11 if degradation.kind == "bicubic" else 11

