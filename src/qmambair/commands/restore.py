"""``qmambair restore``: restore files and folders of images with one model.

Output naming: ``OUT/<path relative to the input folder>/<stem><suffix>.png`` (one input file and an OUT with
an image extension: exactly OUT). An output that would replace one of the inputs is refused unless
``--overwrite-input``; an existing output is skipped unless ``--overwrite``; two inputs mapping to the same
output (``a.jpg`` and ``a.png``) make the second one fail. Alpha (RGBA/LA) is not restored: it is resized with
bicubic interpolation to the output size, clamped, and re-attached (``--drop-alpha`` drops it).

Options are checked before the model is loaded. An input that cannot be used (missing, unreadable, not an
image, an animation, a folder that cannot be listed) is reported by name and the others are still restored;
the exit code is then 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UsageError, UserError
from ..eval.tiling import restore
from ..loading import load_model
from ..models.presets import list_presets

# what a folder's images are recognised by (files named on the command line are tried whatever their suffix)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".gif"}


@dataclass
class Job:
    src: Path
    dst: Path
    problem: str | None = None  # set when the job must not run (reported as failed)


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def _folder_images(root: Path, recursive: bool, errors: list[str]) -> list[Path]:
    """Image files in ``root`` (and its sub-folders if ``recursive``; hidden entries and links to folders
    skipped); a folder that cannot be listed is added to ``errors`` and the rest is still searched."""
    found: list[Path] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            errors.append(f"{folder}: cannot list the folder ({_reason(exc)})")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        pending.append(Path(entry.path))
                elif entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                    found.append(Path(entry.path))
            except OSError as exc:
                errors.append(f"{entry.path}: {_reason(exc)}")
    return sorted(found)


def find_images(inputs: list[str], recursive: bool) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(file, path relative to its input folder) for every image, and errors for inputs that cannot be used
    (missing, or a folder or sub-folder that cannot be listed).

    Files named on the command line are taken whatever their extension (and fail later if unreadable);
    inside folders only files with an image extension are taken, hidden files skipped.
    """
    found: list[tuple[Path, Path]] = []
    errors: list[str] = []
    for item in inputs:
        path = Path(item)
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError as exc:
            errors.append(f"{item}: {_reason(exc)}")
            continue
        if is_dir:
            found += [(p, p.relative_to(path)) for p in _folder_images(path, recursive, errors)]
        elif is_file:
            found.append((path, Path(path.name)))
        else:
            errors.append(f"{item}: no such file or folder")
    return found, errors


def plan_jobs(
    images: list[tuple[Path, Path]], output: Path, suffix: str, single_file: bool, overwrite_input: bool
) -> list[Job]:
    """Output path of every input, with naming conflicts marked as problems."""
    if single_file and output.suffix.lower() in IMAGE_SUFFIXES and not output.is_dir():
        targets = [output]
    else:
        targets = [output / rel.parent / f"{rel.stem}{suffix}.png" for _, rel in images]
    inputs = {src.resolve(): src for src, _ in images}
    jobs: list[Job] = []
    claimed: dict[Path, Path] = {}
    for (src, _), dst in zip(images, targets, strict=True):
        job = Job(src, dst)
        key = dst.resolve()
        if key in claimed:
            job.problem = f"output {dst} is also the output of {claimed[key]}; rename one or use --suffix"
        elif key in inputs and not overwrite_input:
            job.problem = f"output {dst} would replace input {inputs[key]}; use --suffix or --overwrite-input"
        claimed.setdefault(key, src)
        jobs.append(job)
    return jobs


def resize_alpha(alpha: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of an (H, W) alpha plane to (height, width), clamped to [0, 1]."""
    if alpha.shape == (height, width):
        return alpha
    t = torch.from_numpy(np.ascontiguousarray(alpha, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(height, width), mode="bicubic", align_corners=False)
    return out[0, 0].clamp_(0, 1).numpy()


def check_still_image(path: Path) -> None:
    """An ``ImageReadError`` if ``path`` holds several frames (animated GIF, PNG or WebP): only the first
    would be restored."""
    from PIL import Image

    from ..data.io import ImageReadError

    try:
        with Image.open(path) as im:
            frames = int(getattr(im, "n_frames", 1) or 1)
    except Exception:  # noqa: BLE001 - read_image reports unreadable files with the reason
        return
    if frames > 1:
        raise ImageReadError(path, f"it is an animation ({frames} frames); restore reads still images",
                             "Extract the frames first (e.g. ffmpeg -i IN frame%04d.png) and restore those.")


def restore_file(model: torch.nn.Module, job: Job, args: argparse.Namespace, protect: list[Path]) -> None:
    """Read, restore and write one image (raises ImageReadError / OSError / ValueError on failure)."""
    from ..data.io import image_info, read_image, write_image

    bits_in = image_info(job.src).bits
    check_still_image(job.src)
    img, alpha = read_image(job.src, mode="keep", alpha="keep")
    out = restore(model, img, tile=args.tile, mode=args.tile_mode, overlap=args.overlap, device=args.device)
    out = np.clip(out if out.ndim == 3 else out[..., None], 0.0, 1.0)
    if alpha is not None and not args.drop_alpha:
        out = np.concatenate([out, resize_alpha(alpha, *out.shape[:2])[..., None]], axis=2)
    bits = (16 if bits_in > 8 else 8) if args.bits == "auto" else int(args.bits)
    if bits == 16 and job.dst.suffix.lower() != ".png":
        tqdm.write(f"warning: {job.dst}: 16-bit output needs .png; writing 8 bits", file=sys.stderr)
        bits = 8
    write_image(job.dst, out, bits=bits, overwrite=True, protect=protect)


def _load(spec: str, device: str) -> torch.nn.Module:
    if not Path(spec).exists() and spec in list_presets():
        print(f"warning: {spec!r} is a preset name: the model has random weights (for testing only)",
              file=sys.stderr)
    return load_model(spec).to(device).eval()


def inference_mode(model: torch.nn.Module, spec: str, device: str, fake_quant: bool) -> str:
    """Switch a packed (.qmb) model on CPU to int8 integer inference unless ``fake_quant``; returns the mode
    the model will run in: "float", "fake-quant" or "int8"."""
    if getattr(model, "quant_config", None) is None:
        return "float"
    from ..models.checkpoint import locate_model_file

    path = locate_model_file(spec, presets=True)  # a shipped model's name: its file
    packed = path is not None and path.suffix.lower() == ".qmb"
    if fake_quant or not packed or torch.device(device).type != "cpu":
        return "fake-quant"
    import warnings

    from ..quant.integer import enable_integer_inference

    with warnings.catch_warnings(record=True) as caught:  # layers left in fake-quant: one plain line each
        warnings.simplefilter("always")
        enable_integer_inference(model)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return "int8"


def check_options(args: argparse.Namespace) -> None:
    """Refuse bad option values and combinations before anything is read (``UsageError``, exit code 2)."""
    from ..data.io import WRITE_FORMATS
    from ..train.config import check_device

    if args.overlap is not None and args.tile_mode != "blend":
        raise UsageError("--overlap applies to --tile-mode blend only (mambair mode fixes it)")
    if args.overlap is not None and args.tile is None:
        raise UsageError("--overlap needs --tile (blend mode)")
    if args.tile is not None and args.tile_mode == "mambair" and args.tile < 2:
        raise UsageError(f"--tile must be >= 2 in --tile-mode mambair, got {args.tile}")
    if args.tile is not None and args.overlap is not None and args.overlap >= args.tile:
        raise UsageError(f"--overlap must be smaller than --tile ({args.tile}), got {args.overlap}")
    check_device(args.device, "--device")
    out = Path(args.output)
    suffix = out.suffix.lower()
    if suffix in IMAGE_SUFFIXES and suffix not in WRITE_FORMATS and not out.is_dir():
        formats = ", ".join(sorted(WRITE_FORMATS))
        raise UsageError(f"-o {out}: cannot write {suffix} files; use one of {formats}")


def run_restore(args: argparse.Namespace) -> int:
    """Restore every input image; returns 0 if all were restored or skipped, 1 if any failed."""
    from ..data.io import ImageReadError

    check_options(args)
    if getattr(args, "threads", None):
        from ..train.trainer import set_threads

        set_threads(args.threads)
    images, missing = find_images(args.inputs, args.recursive)
    for msg in missing:
        print(f"FAILED  {msg}", file=sys.stderr)
    if not images:
        raise UserError("no input images found" + (" that can be read" if missing else ""))
    single = len(args.inputs) == 1 and Path(args.inputs[0]).is_file()
    out = Path(args.output)
    if out.exists() and not out.is_dir() and not (single and out.suffix.lower() in IMAGE_SUFFIXES):
        raise UserError(f"-o {out} is a file; give a folder for the outputs")
    model = _load(args.model, args.device)
    mode = inference_mode(model, args.model, args.device, getattr(args, "fake_quant", False))
    jobs = plan_jobs(images, Path(args.output), args.suffix, single, args.overwrite_input)
    protect = [] if args.overwrite_input else [src for src, _ in images]
    done, skipped, failed = 0, 0, len(missing)
    seconds = 0.0
    bar = tqdm(jobs, desc="restore", unit="img", disable=True if args.quiet else None, file=sys.stderr)
    for job in bar:
        if job.problem:
            failed += 1
            tqdm.write(f"FAILED  {job.src}: {job.problem}", file=sys.stderr)
            continue
        if job.dst.exists() and not args.overwrite and job.dst.resolve() != job.src.resolve():
            skipped += 1
            tqdm.write(f"skipped {job.src}: {job.dst} exists (--overwrite replaces it)", file=sys.stderr)
            continue
        try:
            start = time.perf_counter()
            restore_file(model, job, args, protect)
            elapsed = time.perf_counter() - start
        except (ImageReadError, OSError, ValueError) as exc:
            failed += 1
            tqdm.write(f"FAILED  {job.src}: {exc}", file=sys.stderr)
            continue
        done += 1
        seconds += elapsed
        if not args.quiet:
            tqdm.write(f"{job.src} -> {job.dst}: {elapsed:.2f} s ({mode})", file=sys.stderr)
    bar.close()
    per_image = f", {seconds / done:.2f} s per image ({mode})" if done else ""
    print(f"restored {done}, skipped {skipped}, failed {failed} -> {args.output}{per_image}", file=sys.stderr)
    return 1 if failed else 0
