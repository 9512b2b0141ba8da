"""Score a model on benchmark folders, image by image: what ``qmambair test`` runs (docs/evaluation.md §5.4).

A test folder is one of the layouts of ``qmambair.data.datasets.find_pairs`` (docs/evaluation.md §5.3): the
EDSR pack ``Set5/HR`` + ``Set5/LR_bicubic/X4``, DIV2K ``DIV2K_valid_HR`` + ``DIV2K_valid_LR_bicubic/X4``, or a
plain folder of HR images whose LR is made with MATLAB bicubic after modcrop; a folder holding several such
sets (``benchmark/Set5/HR``, ``benchmark/Set14/HR``, ...) is expanded into them. When an LR folder for the
scale exists, every HR image must have its LR file there.

Each image is read and degraded by ``load_samples`` / ``EvalImages`` (the degradation of training
validation: denoising noise seeded 0 per image, JPEG with Pillow), restored with ``qmambair.eval.tiling``
(optionally tiled, optionally x8 self-ensemble) and scored with ``qmambair.eval.metrics``; the caller chooses
the metric settings (``qmambair.train.validate.metric_settings``: Y channel and border = scale for SR, all
channels without border for denoising and JPEG). An image that cannot be read, is too small, or whose LR file
has the wrong size stops the run with a ``ValueError`` naming it: a benchmark mean must cover every image.

Two named sets need no folder (``named_test_set``): ``@builtin``, the built-in images of
``qmambair.data.builtin`` (written once as PNG files under the cache, ``cache_root()/builtin``), and
``@pool``, the test split of the fetched photo pool (``qmambair data fetch``; never used for training).
``centre_crop`` scores the centre crop of each image that training validation uses (``EvalImages``).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from torch import nn

from ..data.datasets import (
    Degradation,
    EvalImages,
    SkippedImageWarning,
    find_pairs,
    load_samples,
    min_eval_size,
)
from ..data.io import write_image
from ..fileio import atomic_path
from ..models.presets import get_preset
from .ensemble import self_ensemble
from .metrics import psnr, ssim
from .tiling import model_channels, restore

__all__ = [
    "NAMED_SETS",
    "TestSet",
    "ImageScore",
    "find_test_sets",
    "named_test_set",
    "model_degradation",
    "output_path",
    "check_outputs",
    "score_test_set",
    "nonfinite_count",
    "summarize",
    "format_table",
    "write_scores_csv",
]


@dataclass(frozen=True)
class TestSet:
    """One benchmark set: its name, the folder of its HR images, its LR folder (None: LR made on the fly) and
    the ``(HR file, LR file or None)`` pairs."""

    __test__ = False  # not a pytest test class

    name: str
    hr_dir: Path
    lr_dir: Path | None
    pairs: tuple[tuple[Path, Path | None], ...]
    layout: str  # "HR + LR_bicubic", "DIV2K" or "HR images"

    def image_name(self, hr: Path) -> str:
        """The name of an image in tables and CSV files: its path inside the HR folder."""
        return hr.relative_to(self.hr_dir).as_posix()

    @property
    def lr_source(self) -> str:
        """Where the network input comes from: ``files`` (the LR folder) or ``made`` (from HR)."""
        return "files" if self.lr_dir is not None else "made"


@dataclass(frozen=True)
class ImageScore:
    """PSNR (dB) and SSIM of one restored image."""

    dataset: str
    image: str
    psnr: float
    ssim: float


def _hr_children(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith("_HR"))


def _is_set(root: Path) -> bool:
    """True for a folder that ``find_pairs`` reads as one of its paired layouts."""
    return (root / "HR").is_dir() or root.name.endswith("_HR") or len(_hr_children(root)) == 1


def _layout(root: Path, scale: int) -> tuple[str, str, Path, Path | None]:
    """(name, layout, HR folder, LR folder where ``find_pairs`` looks for LR files) of one set."""
    if (root / "HR").is_dir():
        return root.name, "HR + LR_bicubic", root / "HR", root / "LR_bicubic" / f"X{scale}"
    hr_dirs = _hr_children(root)
    hr = root if root.name.endswith("_HR") else hr_dirs[0] if len(hr_dirs) == 1 else None
    if hr is None:
        return root.name, "HR images", root, None
    return hr.name[:-3], "DIV2K", hr, hr.parent / f"{hr.name[:-3]}_LR_bicubic" / f"X{scale}"


def _test_set(root: Path, scale: int) -> TestSet:
    name, layout, hr_dir, lr_dir = _layout(root, scale)
    pairs = find_pairs(root, scale)
    if scale < 2 or lr_dir is None or not lr_dir.is_dir():
        lr_dir = None
    else:
        missing = [hr for hr, lr in pairs if lr is None]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            first = missing[0]
            raise FileNotFoundError(
                f"{lr_dir}: no LR file for {first.relative_to(hr_dir).as_posix()}{more} (expected "
                f"{first.stem}x{scale}{first.suffix}); remove the LR folder to make LR from HR instead"
            )
    return TestSet(name, hr_dir, lr_dir, tuple(pairs), layout)


NAMED_SETS = ("@builtin", "@pool")


def _builtin_folder() -> Path:
    """The built-in images as PNG files under the cache: written on first use (lossless 8-bit) and rewritten
    whenever a cached file does not hold exactly the built-in pixels."""
    from ..data.builtin import builtin_raw, list_builtin
    from ..data.io import ImageReadError, read_image
    from ..data.photos import cache_root

    root = cache_root() / "builtin"
    for name in list_builtin():
        path, pixels = root / f"{name}.png", builtin_raw(name)
        try:
            stored = read_image(path, mode="keep") if path.is_file() else None
        except ImageReadError:
            stored = None
        cached = None if stored is None else np.round(stored * 255.0).astype(np.uint8)
        if cached is None or not np.array_equal(cached, pixels):
            write_image(path, pixels)
    return root


def named_test_set(name: str) -> TestSet:
    """``@builtin`` (the built-in images) or ``@pool`` (the photo pool's test split) as a test set.

    Raises ``ValueError`` for another name, ``PhotosNotFetchedError`` (a ``FileNotFoundError``) when the pool
    was not fetched, ``ImportError`` when the packages of the built-in images are missing.
    """
    if name == "@builtin":
        root = _builtin_folder()
        from ..data.builtin import list_builtin

        paths = [root / f"{n}.png" for n in list_builtin()]
        return TestSet("builtin", root, None, tuple((p, None) for p in paths), "HR images")
    if name == "@pool":
        from ..data.photos import photo_paths, photos_dir

        paths = photo_paths("test")
        return TestSet("pool-test", photos_dir(), None, tuple((p, None) for p in paths), "HR images")
    raise ValueError(f"unknown named test set {name!r}; choose one of {', '.join(NAMED_SETS)}")


def find_test_sets(folder: str | os.PathLike, scale: int) -> list[TestSet]:
    """The benchmark sets in ``folder``: the folder itself, or each set below it (``NAME/HR``, ``*_HR``);
    a name of ``NAMED_SETS`` gives that set (``named_test_set``).

    Raises ``FileNotFoundError`` for a missing folder, a folder without images, or a missing LR file.
    """
    if str(folder).startswith("@"):
        return [named_test_set(str(folder))]
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"test folder {root} does not exist (or is not a folder)")
    root = root.resolve()
    if _is_set(root):
        return [_test_set(root, scale)]
    subs = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") and _is_set(p)]
    if subs:
        return [_test_set(p, scale) for p in subs]
    return [_test_set(root, scale)]


def model_degradation(
    model: nn.Module, scale: int | None = None, sigma: float | None = None, quality: int | None = None
) -> Degradation:
    """The test degradation of ``model``: bicubic x its scale for SR, else the noise / JPEG of its preset.

    ``scale`` must match the model's; ``sigma`` or ``quality`` choose the degradation of a denoising or JPEG
    model explicitly (needed when the model carries no preset, e.g. an official ``.pth`` file).
    """
    upscale = int(getattr(model, "upscale", 1) or 1)
    if upscale > 1:
        if scale is not None and scale != upscale:
            raise ValueError(f"the model super-resolves x{upscale}; it cannot be tested at x{scale}")
        if sigma is not None or quality is not None:
            raise ValueError(f"the model super-resolves x{upscale}; sigma/quality apply to denoising/JPEG")
        return Degradation("bicubic", scale=upscale)
    if scale is not None and scale != 1:
        raise ValueError(f"the model does not upscale (denoising or JPEG); it cannot be tested at x{scale}")
    if sigma is not None and quality is not None:
        raise ValueError("give a noise sigma or a JPEG quality, not both")
    if sigma is not None:
        return Degradation("noise", scale=1, sigma=float(sigma))
    if quality is not None:
        return Degradation("jpeg", scale=1, quality=int(quality))
    preset = getattr(model, "preset", None)
    spec = get_preset(preset).get("degradation", {}) if preset else {}
    if spec.get("type") not in ("noise", "jpeg"):
        raise ValueError("the model does not upscale and records no denoising/JPEG preset: "
                         "give the noise sigma or the JPEG quality")
    return Degradation.from_dict(spec)


def output_path(out_dir: str | os.PathLike, test_set: TestSet, hr: Path) -> Path:
    """Where the restored image of ``hr`` goes: ``OUT/<set name>/<path in the HR folder>.png``."""
    rel = hr.relative_to(test_set.hr_dir)
    return Path(out_dir) / test_set.name / rel.parent / f"{rel.stem}.png"


def _inputs(test_sets: Sequence[TestSet]) -> set[Path]:
    return {p.resolve() for s in test_sets for pair in s.pairs for p in pair if p is not None}


def check_outputs(
    test_sets: Sequence[TestSet], out_dir: str | os.PathLike | None, csv_path: str | os.PathLike | None,
    overwrite: bool = False,
) -> None:
    """Refuse, before any work, outputs that would replace an input, land inside a test folder, or replace an
    existing file without ``overwrite``; and two sets of one name (their outputs would collide)."""
    names = [s.name for s in test_sets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two test sets are named {twice[0]}; give each set once (names come from folders)")
    inputs = _inputs(test_sets)
    targets = [Path(csv_path)] if csv_path is not None else []
    if out_dir is not None:
        out = Path(out_dir).resolve()
        for s in test_sets:
            if out == s.hr_dir or s.hr_dir in out.parents:
                raise ValueError(f"--out {out_dir} is inside the test folder {s.hr_dir}: the restored images "
                                 "would be read as test images; choose a folder outside it")
        targets += [output_path(out_dir, s, hr) for s in test_sets for hr, _ in s.pairs]
    for target in targets:
        if target.resolve() in inputs:
            raise ValueError(f"{target} is one of the test images; choose another output")
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]} exists{more}; pass --overwrite to replace")


def _degraded(
    pair: tuple[Path, Path | None], degradation: Degradation, channels: int, centre_crop: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of one image as float32 HWC arrays, optionally its centre crop of ``centre_crop``
    target pixels; a ``ValueError`` naming what is wrong with it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedImageWarning)
        try:
            samples, _ = load_samples([pair], degradation, channels, min_eval_size(degradation))
        except SkippedImageWarning as exc:
            reason = str(exc).removesuffix("; making bicubic LR instead").removeprefix("skipping ")
            raise ValueError(reason) from None
    _, lq, hr = EvalImages(samples, degradation, crop=centre_crop)[0]
    return lq.numpy().transpose(1, 2, 0), hr.numpy().transpose(1, 2, 0)


def score_test_set(
    model: nn.Module,
    test_set: TestSet,
    degradation: Degradation,
    crop_border: int,
    y_channel: bool,
    *,
    tile: int | None = None,
    tile_mode: str = "mambair",
    ensemble: bool = False,
    device: str | None = None,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Callable[[ImageScore], None] | None = None,
    centre_crop: int = 0,
) -> list[ImageScore]:
    """Restore and score every image of ``test_set`` (or its centre crop of ``centre_crop`` target pixels);
    with ``out_dir``, also write each output as 8-bit PNG (the image that was scored). ``progress`` is called
    after each image. An output with NaN or inf values (a model unstable on full-size images) is scored
    PSNR = SSIM = NaN, and its picture is written with NaN as 0 and ±inf as 1/0."""
    channels = model_channels(model)
    run = partial(restore, model, tile=tile, mode=tile_mode, device=device)
    protect = sorted(_inputs([test_set]))
    scores = []
    for pair in test_set.pairs:
        lq, hr = _degraded(pair, degradation, channels, centre_crop)
        out = self_ensemble(run, lq) if ensemble else run(lq)
        if out.shape != hr.shape:
            raise ValueError(f"{pair[0]}: the model made {out.shape[1]}x{out.shape[0]} from an input of "
                             f"{lq.shape[1]}x{lq.shape[0]}, expected {hr.shape[1]}x{hr.shape[0]}")
        name = test_set.image_name(pair[0])
        if np.all(np.isfinite(out)):
            score = ImageScore(test_set.name, name, psnr(out, hr, crop_border, y_channel),
                               ssim(out, hr, crop_border, y_channel))
        else:  # an unstable model's result, not an error: scored NaN (see ``nonfinite_count``)
            score = ImageScore(test_set.name, name, math.nan, math.nan)
            out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
        if out_dir is not None:
            write_image(output_path(out_dir, test_set, pair[0]), np.clip(out, 0.0, 1.0), overwrite=overwrite,
                        protect=protect)
        scores.append(score)
        if progress is not None:
            progress(score)
    return scores


def nonfinite_count(scores: Sequence[ImageScore]) -> int:
    """How many of ``scores`` are of outputs with NaN or inf values (scored NaN by ``score_test_set``)."""
    return sum(math.isnan(s.psnr) for s in scores)


def summarize(scores: Sequence[ImageScore]) -> list[tuple[str, int, float, float]]:
    """``(dataset, images, mean PSNR, mean SSIM)`` per dataset, in order of first appearance."""
    by_set: dict[str, list[ImageScore]] = {}
    for s in scores:
        by_set.setdefault(s.dataset, []).append(s)
    return [(name, len(rows), float(np.mean([r.psnr for r in rows])), float(np.mean([r.ssim for r in rows])))
            for name, rows in by_set.items()]


def format_table(scores: Sequence[ImageScore], lr_source: dict[str, str] | None = None) -> str:
    """A plain-text table of the per-dataset means (``lr_source``: the input column, by dataset)."""
    rows = summarize(scores)
    width = max([len("dataset")] + [len(r[0]) for r in rows])
    lines = [f"{'dataset':<{width}}  images  {'input':<5}  {'PSNR':>8}  {'SSIM':>6}"]
    for name, n, p, s in rows:
        lr = (lr_source or {}).get(name, "")
        lines.append(f"{name:<{width}}  {n:>6}  {lr:<5}  {p:>8.4f}  {s:>6.4f}")
    return "\n".join(lines)


def _number(x: float) -> str:
    return f"{x:.6f}" if math.isfinite(x) else str(x)


def write_scores_csv(path: str | os.PathLike, scores: Sequence[ImageScore], overwrite: bool = False) -> Path:
    """``dataset,image,psnr,ssim``: one row per image, then per dataset a row with image ``mean``."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} exists; pass --overwrite to replace")
    with atomic_path(p) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "image", "psnr", "ssim"])
        for s in scores:
            writer.writerow([s.dataset, s.image, _number(s.psnr), _number(s.ssim)])
        for name, _, p_mean, s_mean in summarize(scores):
            writer.writerow([name, "mean", _number(p_mean), _number(s_mean)])
    return p
