"""``qmambair data fetch``: prepare the built-in photo pool (see ``qmambair.data.photos``)."""

from __future__ import annotations

import argparse
import sys


def run_fetch(args: argparse.Namespace) -> int:
    """Fetch and prepare the photo pool; returns the exit code."""
    from ..data.photos import fetch_photos

    try:
        fetch_photos(cache=args.cache, debs=args.debs, update=args.update, force=args.force)
    except RuntimeError as exc:
        print(f"qmambair data fetch: error: {exc}", file=sys.stderr)
        return 1
    return 0


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``qmambair data fetch``."""
    p = sub.add_parser("data", help="prepare training data (the built-in photo pool)",
                       description="Data preparation commands.")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION")
    f = actions.add_parser(
        "fetch",
        help="download and prepare the built-in photo pool",
        description="apt-get download six Debian packages with 47 real photographs (about 226 MB, nothing is "
        "installed), extract them, make clean HR PNGs (MATLAB-bicubic downscaling of large JPEGs) and a "
        "manifest with licences, checksums and the train/test split. Idempotent: finished photos are kept.",
    )
    f.add_argument("--cache", metavar="DIR", default=None,
                   help="output folder (default: $QMAMBAIR_CACHE/photos or ~/.cache/qmambair/photos)")
    f.add_argument("--debs", metavar="DIR", default=None,
                   help="use the .deb files in DIR instead of apt-get download")
    f.add_argument("--update", action="store_true", help="run `apt-get update` first")
    f.add_argument("--force", action="store_true", help="redo every photo")
    f.set_defaults(func=run_fetch)
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])
