"""The built-in photo pool: 47 real photographs from six Debian packages, as clean PNG.

Sources and licences: docs/evaluation.md §5.2.

``fetch_photos()`` (``qmambair data fetch``) does, once:

1. ``apt-get download`` the six ``Architecture: all`` packages into a temporary folder (nothing is installed;
   ``--debs DIR`` uses .deb files fetched elsewhere instead);
2. extracts them (``dpkg-deb -x``, or a pure-Python reader of the .deb's ar + tar.xz when dpkg-deb is absent);
3. makes clean HR images: a JPEG whose short side is above 1400 px is shrunk with MATLAB bicubic
   (antialiased) by the integer factor that brings its short side into 1000-1400 px, or, when no integer
   factor does, to a short side of exactly 1200 px. That removes most compression artefacts. Smaller JPEGs and
   the lossless libjxl PNGs are kept at their size. Results are 8-bit PNG (grey photos stay grey);
4. assigns a split by file name: ``test`` when the first 8 hex digits of ``sha256("qmambair:" + name)``
   taken mod 100 are below 15, else ``train`` (6 of the 47 photos are test, one per source family or two;
   one photo's membership never depends on the others). Train only on ``train``;
5. writes ``manifest.json`` (source package and version, path inside it, licence, author, SHA-256 of the
   source and of the PNG, sizes, downscale factor, split).

The cache folder is ``$QMAMBAIR_CACHE/photos`` (default ``~/.cache/qmambair/photos``), never the repository:
the photos carry attribution licences. Running it again skips what is already done and verified.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .imresize import imresize
from .io import read_image, write_image

__all__ = [
    "PHOTOS",
    "PACKAGES",
    "PhotoSource",
    "PhotosNotFetchedError",
    "cache_root",
    "photos_dir",
    "split_of",
    "clean_size",
    "fetch_photos",
    "load_manifest",
    "photo_paths",
]

MANIFEST = "manifest.json"
TEST_PERCENT = 15
SPLIT_SALT = "qmambair:"
SHORT_MIN, SHORT_MAX, SHORT_TARGET = 1000, 1400, 1200


@dataclass(frozen=True)
class PhotoSource:
    """One photo: cache name, Debian package, path inside it, licence and author (for attribution)."""

    name: str
    package: str
    path: str
    licence: str
    author: str = ""

    @property
    def lossless(self) -> bool:
        return self.path.lower().endswith(".png")


def _lomiri(stem: str, licence: str, package: str = "lomiri-wallpapers-16.04") -> PhotoSource:
    author = stem.split("_by_", 1)[1].replace("_", " ").strip() if "_by_" in stem else ""
    return PhotoSource(f"lomiri-{stem}", package, f"usr/share/backgrounds/{stem}.jpg", licence, author)


_BY, _SA = "CC-BY-4.0", "CC-BY-SA-4.0"
_LOMIRI16 = {
    "Bridge_by_Sander_Klootwijk": _SA, "Dragonfly_by_Bolly": _SA, "Picture_0B_by_freespace": _BY,
    "Picture_1A_by_freespace": _BY, "Wine_by_Jakkub_Mede": _BY, "aitzgorri_by_Aitzol_Berasategi": _BY,
    "analogpattern_by_Peter_Nerlich": _SA, "free_by_Peter_Nerlich": _SA,
    "friends_by_Aitzol_Berasategi": _BY, "greentock_by_Peter_Nerlich": _SA,
    "life_by_Aitzol_Berasategi": _BY, "picosdeeuropa_by_Aitzol_Berasategi": _BY,
    "seeding_by_Clements_Engelhardt": "CC0-1.0", "sunset_by_Aitzol_Berasategi": _BY,
}  # umang_* is digital art, left out (docs/evaluation.md §5.2)
_MATE = ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
         "TwoWings", "Wood", "YellowFlower")
_PLASMA = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
           "Kite", "OneStandsOut", "Path", "summer_1am")
_PALAPELI = ("castle-maintenon", "cincinnati-bridge", "citrus-fruits", "european-honey-bee",
             "panther-chameleon-female")
_JXL500 = ("cvo9xd_keong_macan", "tmshre_riaphotographs", "u76c0g_bliznaca")

PHOTOS: tuple[PhotoSource, ...] = (
    *(_lomiri(stem, lic) for stem, lic in _LOMIRI16.items()),
    _lomiri("Kleiber_by_Lukas_Baubkus", "CC-BY-SA-3.0", "lomiri-wallpapers-20.04"),
    *(PhotoSource(f"mate-{n}", "mate-backgrounds", f"usr/share/backgrounds/mate/nature/{n}.jpg", "GPL-2+")
      for n in _MATE),
    *(PhotoSource(f"plasma-{n}", "plasma-workspace-wallpapers",
                  f"usr/share/wallpapers/{n}/contents/images/2560x1600.jpg", "LGPL-3") for n in _PLASMA),
    *(PhotoSource(f"palapeli-{n}", "palapeli-data", f"usr/share/palapeli/collection/{n}.jpg", "GPL-2+")
      for n in _PALAPELI),
    PhotoSource("libjxl-flower", "libjxl-testdata", "usr/share/libjxl-testdata/jxl/flower/flower.png",
                "BSD-3-clause"),
    *(PhotoSource(f"libjxl-{n}", "libjxl-testdata",
                  f"usr/share/libjxl-testdata/external/wesaturate/500px/{n}_srgb8.png", "CC0")
      for n in _JXL500),
)
PACKAGES: tuple[str, ...] = tuple(dict.fromkeys(p.package for p in PHOTOS))


class PhotosNotFetchedError(FileNotFoundError):
    """The photo pool is not in the cache (or is incomplete); the message says how to get it."""


def cache_root() -> Path:
    """``$QMAMBAIR_CACHE`` or ``~/.cache/qmambair``: where fetched and derived data live."""
    env = os.environ.get("QMAMBAIR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qmambair"


def photos_dir(cache: str | os.PathLike | None = None) -> Path:
    """The photo pool's folder: ``cache`` if given, else ``cache_root()/photos``."""
    return Path(cache).expanduser() if cache else cache_root() / "photos"


def split_of(name: str) -> str:
    """``"test"`` or ``"train"`` for a photo name (hash rule in the module docstring; about 15 % test)."""
    digest = hashlib.sha256((SPLIT_SALT + name).encode()).hexdigest()
    return "test" if int(digest[:8], 16) % 100 < TEST_PERCENT else "train"


def clean_size(height: int, width: int, lossless: bool = False) -> tuple[tuple[int, int], float]:
    """Target (height, width) of the clean HR image and the downscale factor (1.0 = kept as is)."""
    short = min(height, width)
    if lossless or short <= SHORT_MAX:
        return (height, width), 1.0
    for k in range(2, short // SHORT_MIN + 1):
        if SHORT_MIN <= short / k <= SHORT_MAX:
            return (-(-height // k), -(-width // k)), float(k)  # MATLAB: ceil(size / k)
    factor = short / SHORT_TARGET
    return (round(height / factor), round(width / factor)), factor


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(cache: str | os.PathLike | None = None) -> dict:
    """The pool's ``manifest.json`` as a dict (``{"photos": [...], ...}``); raises if it was never fetched."""
    path = photos_dir(cache) / MANIFEST
    if not path.is_file():
        raise PhotosNotFetchedError(
            f"the photo pool is not in {path.parent}: run `qmambair data fetch` first (or pass "
            "--data FOLDER with your own images)"
        )
    return json.loads(path.read_text())


def photo_paths(split: str = "train", cache: str | os.PathLike | None = None) -> list[Path]:
    """PNG files of one split (``"train"``, ``"test"`` or ``"all"``), sorted by name."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    root = photos_dir(cache)
    entries = load_manifest(cache)["photos"]
    paths = [root / e["file"] for e in entries if split in ("all", e["split"])]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise PhotosNotFetchedError(f"{len(missing)} photo(s) missing from {root} (e.g. {missing[0]}); "
                                    "run `qmambair data fetch` again")
    return sorted(paths)


# ------------------------------------------------------------------------------------------ fetching


def _tool_help(missing: str) -> str:
    pkgs = " ".join(PACKAGES)
    return (f"`{missing}` is not available here, so the Debian packages cannot be fetched on this machine. "
            f"On any Debian/Ubuntu machine run `apt-get download {pkgs}`, copy the .deb files here and run "
            "`qmambair data fetch --debs DIR`; or train on your own images: `qmambair train --data FOLDER`")


def _download(packages: list[str], dest: Path, log: Callable[[str], None]) -> None:
    if shutil.which("apt-get") is None:
        raise RuntimeError(_tool_help("apt-get"))
    log(f"apt-get download {' '.join(packages)}")
    proc = subprocess.run(["apt-get", "download", *packages], cwd=dest, capture_output=True, text=True)
    if proc.returncode != 0:
        hint = ("the package lists may be stale or empty: run `apt-get update` (as root), or pass --update"
                if "Unable to locate" in proc.stderr or "404" in proc.stderr else "see apt's message above")
        raise RuntimeError(f"apt-get download failed:\n{proc.stderr.strip()}\n{hint}")


def _deb_members(deb: Path) -> dict[str, bytes]:
    """Members of a .deb (an ar archive) by name; only what tarfile needs, no external tool."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{deb} is not a .deb (ar) archive")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def _extract(deb: Path, dest: Path, wanted: set[str]) -> None:
    """``dpkg-deb -x deb dest`` when dpkg-deb exists, else read the data.tar.* member in Python."""
    if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, capture_output=True)
        return
    members = _deb_members(deb)
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None or name.endswith(".zst"):
        raise RuntimeError(_tool_help("dpkg-deb") + f" ({deb.name} holds {name or 'no data.tar'})")
    with tarfile.open(fileobj=io.BytesIO(members[name])) as tar:
        for member in tar.getmembers():
            path = member.name.removeprefix("./")
            if path in wanted and member.isfile():
                tar.extract(member, dest, filter="data")  # './usr/...' lands at dest/usr/...


def _deb_version(deb: Path) -> str:
    parts = deb.name.removesuffix(".deb").split("_")
    return parts[1].replace("%3a", ":") if len(parts) >= 2 else ""


def _make_clean(src: Path, dst: Path, photo: PhotoSource) -> dict:
    """Read a source photo, downscale it (``clean_size``), write the PNG; returns the manifest entry."""
    img = read_image(src, mode="keep")
    h, w = img.shape[:2]
    (th, tw), factor = clean_size(h, w, photo.lossless)
    if factor != 1.0:
        img = np.clip(imresize(img.astype(np.float64), output_shape=(th, tw)), 0.0, 1.0)
    write_image(dst, img)
    return {
        "name": photo.name,
        "file": dst.name,
        "split": split_of(photo.name),
        "package": photo.package,
        "source_path": "/" + photo.path,
        "licence": photo.licence,
        "author": photo.author,
        "source_sha256": _sha256(src),
        "source_size": [w, h],
        "downscale": round(factor, 6),
        "size": [tw, th],
        "channels": int(img.shape[2]) if img.ndim == 3 else 1,
        "sha256": _sha256(dst),
        "bytes": dst.stat().st_size,
    }


def _done(root: Path, old: dict[str, dict]) -> set[str]:
    """Names whose PNG is in the cache and matches the manifest's SHA-256."""
    return {n for n, e in old.items()
            if (root / e["file"]).is_file() and _sha256(root / e["file"]) == e["sha256"]}


def fetch_photos(
    cache: str | os.PathLike | None = None,
    debs: str | os.PathLike | None = None,
    update: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Prepare the photo pool in ``photos_dir(cache)`` (see the module docstring); returns the manifest.

    ``debs``: a folder with the six .deb files (no apt-get needed). ``update``: run ``apt-get update`` first.
    ``force``: redo every photo. Photos already present with a matching checksum are kept.
    """
    root = photos_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        old = {} if force else {e["name"]: e for e in load_manifest(root)["photos"]}
    except (PhotosNotFetchedError, json.JSONDecodeError, KeyError):
        old = {}
    done = _done(root, old)
    todo = [p for p in PHOTOS if p.name not in done]
    entries = {n: old[n] for n in done if n in {p.name for p in PHOTOS}}
    if not todo:
        log(f"photo pool complete in {root} ({len(entries)} photos); nothing to do")
    else:
        log(f"preparing {len(todo)} of {len(PHOTOS)} photos in {root}")
        with tempfile.TemporaryDirectory(prefix="qmambair-debs-") as tmp:
            tmp_path = Path(tmp)
            packages = list(dict.fromkeys(p.package for p in todo))
            if debs is None:
                if update:
                    log("apt-get update")
                    subprocess.run(["apt-get", "update"], check=True, capture_output=True)
                _download(packages, tmp_path, log)
                deb_dir = tmp_path
            else:
                deb_dir = Path(debs)
            files = {pkg: sorted(deb_dir.glob(f"{pkg}_*.deb")) for pkg in packages}
            missing = [pkg for pkg, found in files.items() if not found]
            if missing:
                raise FileNotFoundError(f"no .deb for {', '.join(missing)} in {deb_dir}")
            tree = tmp_path / "tree"
            for pkg in packages:
                log(f"extracting {files[pkg][-1].name}")
                _extract(files[pkg][-1], tree, {p.path for p in todo if p.package == pkg})
            for i, photo in enumerate(todo, 1):
                src = tree / photo.path
                if not src.is_file():
                    raise FileNotFoundError(f"{photo.path} is not in package {photo.package}; the package "
                                            "version may differ from Debian bookworm's")
                entry = _make_clean(src, root / f"{photo.name}.png", photo)
                entry["package_version"] = _deb_version(files[photo.package][-1])
                entries[photo.name] = entry
                log(f"[{i}/{len(todo)}] {photo.name}: {entry['source_size'][0]}x{entry['source_size'][1]} -> "
                    f"{entry['size'][0]}x{entry['size'][1]} ({entry['split']})")
    ordered = [entries[p.name] for p in PHOTOS]
    manifest = {
        "format": "qmambair-photos",
        "version": 1,
        "split_rule": f"test iff int(sha256('{SPLIT_SALT}' + name)[:8], 16) % 100 < {TEST_PERCENT}",
        "clean_rule": f"JPEG short side > {SHORT_MAX}: MATLAB bicubic down by the integer factor giving "
                      f"{SHORT_MIN}-{SHORT_MAX} px, else to {SHORT_TARGET} px; smaller JPEGs and PNGs kept",
        "photos": ordered,
    }
    tmp_manifest = root / f".{MANIFEST}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp_manifest, root / MANIFEST)
    n_test = sum(e["split"] == "test" for e in ordered)
    mb = sum(e["bytes"] for e in ordered) / 1e6
    log(f"{len(ordered)} photos ({len(ordered) - n_test} train, {n_test} test, {mb:.0f} MB) in {root} "
        f"[{time.perf_counter() - started:.0f} s]")
    return manifest
