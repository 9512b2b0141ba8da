"""Command line: ``qmambair COMMAND ...``. Commands only parse arguments and call the library.

Adding a command: write ``add_<name>_parser(sub)`` that creates a subparser and sets ``func`` (a callable
taking the parsed namespace and returning an exit code; import heavy modules inside it so ``--help`` stays
fast), then append it to ``COMMANDS`` (or call ``register_command``).

Errors: :func:`main` is the one boundary. A mistake of the user's (``qmambair.errors.UserError``, a missing or
unreadable file, a bad value; see ``qmambair.commands.errors``) becomes one line ``qmambair COMMAND: error:
...`` on stderr and exit code 1 (2 for a bad option, as argparse does); any other exception is a bug: its
traceback is shown with a request to report it. ``QMAMBAIR_TRACEBACK=1`` shows the traceback of user errors
too.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from . import __version__
from .allocator import keep_freed_memory

SubParsers = argparse._SubParsersAction  # the object ``add_subparsers()`` returns


def _size(text: str) -> tuple[int, int]:
    """``HxW`` (or ``N`` for N x N) -> (H, W)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"size must look like HxW (e.g. 360x640), got {text!r}")
    return values[0], values[1]


def _positive(text: str) -> int:
    from .commands.options import positive_int

    return positive_int(text)


def _nonnegative(text: str) -> int:
    from .commands.options import nonnegative_int

    return nonnegative_int(text)


def add_restore_parser(sub: SubParsers) -> None:
    p = sub.add_parser(
        "restore",
        help="restore / super-resolve images with a model",
        description="Restore one image, many images or folders of images. Outputs are PNG files named "
        "<stem><suffix>.png in OUT (OUT may be a file name when there is one input). Unreadable inputs are "
        "reported and skipped; the exit code is 1 if any input failed. RGBA/LA: the alpha channel is not "
        "restored but resized with bicubic interpolation to the output size and re-attached (--drop-alpha "
        "drops it). A grey image into an RGB model is replicated to RGB and the result turned back to grey; "
        "an RGB image into a grey model is converted to luma (BT.601) and the result is grey.",
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help="image files and/or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (or file, one input)")
    p.add_argument("-m", "--model", required=True, metavar="MODEL",
                   help="model file (.pth/.safetensors/.qmb) or preset name (random weights: tests only)")
    from .commands.options import add_tiling_options

    add_tiling_options(p, _positive)
    p.add_argument("--overlap", type=_nonnegative, default=None,
                   help="blend mode: pixels shared by neighbours (N/8)")
    p.add_argument("-r", "--recursive", action="store_true", help="look into sub-folders of input folders")
    p.add_argument("--suffix", default="", help="added to each output file's stem (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--overwrite-input", action="store_true",
                   help="allow an output to replace one of the input files")
    p.add_argument("--bits", choices=("auto", "8", "16"), default="auto",
                   help="PNG bit depth; auto: 16 for 16-bit inputs, else 8 (default: %(default)s)")
    p.add_argument("--drop-alpha", action="store_true", help="write RGB/grey even if the input has alpha")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="CPU threads for torch and the scan (default: library default)")
    p.add_argument("--fake-quant", action="store_true",
                   help="packed .qmb models on CPU: run the fake-quant float path instead of the int8 "
                   "integer kernels (the default), e.g. to compare outputs or times")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no per-image times")

    def run(args: argparse.Namespace) -> int:
        from .commands.restore import run_restore

        return run_restore(args)

    p.set_defaults(func=run)


def add_info_parser(sub: SubParsers) -> None:
    p = sub.add_parser(
        "info",
        help="show a model's config, parameters and MACs",
        description="Print a model's config, preset, parameter count and MACs (scan counted explicitly; see "
        "qmambair.eval.complexity) for an input size, and its quantization config if it is quantized.",
    )
    p.add_argument("model", metavar="MODEL", help="model file or preset name")
    p.add_argument("--size", type=_size, default=None, metavar="HxW",
                   help="input size (default: the input giving a 1280x720 output, e.g. 360x640 for x2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    def run(args: argparse.Namespace) -> int:
        from .commands.info import run_info

        return run_info(args)

    p.set_defaults(func=run)


def _builtin_commands() -> list[Callable[[SubParsers], None]]:
    from .commands.benchmark import add_benchmark_parser
    from .commands.data import add_data_parser
    from .commands.demo import add_demo_parser
    from .commands.export import add_export_parser
    from .commands.test import add_test_parser
    from .commands.train import add_qat_parser, add_train_parser

    return [add_demo_parser, add_restore_parser, add_info_parser, add_data_parser, add_train_parser,
            add_qat_parser, add_export_parser, add_benchmark_parser, add_test_parser]


COMMANDS: list[Callable[[SubParsers], None]] = _builtin_commands()


def register_command(adder: Callable[[SubParsers], None]) -> Callable[[SubParsers], None]:
    """Add a subcommand (``add_<name>_parser(sub)``) to the parser; usable as a decorator."""
    if adder not in COMMANDS:
        COMMANDS.append(adder)
    return adder


def build_parser() -> argparse.ArgumentParser:
    """The ``qmambair`` parser with one subparser per entry of ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="qmambair", description="MambaIR image restoration, quantized to 2-4 bits (Q-MambaIR), on CPU."
    )
    parser.add_argument("--version", action="version", version=f"qmambair {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for adder in COMMANDS:
        adder(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qmambair`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    keep_freed_memory()  # tensors' memory is reused, not page-faulted in again (qmambair/allocator.py)
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return report_error(exc, f"qmambair {args.command}")


def report_error(exc: BaseException, prog: str = "qmambair") -> int:
    """Print ``exc`` as the user's mistake (one line) or as a bug (traceback); returns the exit code."""
    from .commands.errors import describe_user_error

    found = describe_user_error(exc)
    if found is None or os.environ.get("QMAMBAIR_TRACEBACK"):
        traceback.print_exception(exc, file=sys.stderr)
    if found is None:
        print(f"{prog}: internal error ({type(exc).__name__}): this is a bug in qmambair {__version__}; "
              "please report it with the command line and the traceback above", file=sys.stderr)
        return 1
    message, code = found
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
