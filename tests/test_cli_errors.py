"""Every user mistake gets one line ``qmambair COMMAND: error: ...`` and a non-zero exit code (2 for a bad
option), no traceback, and leaves every existing file byte-identical; a bug still shows its traceback.

Runs ``qmambair.cli.main`` in-process. Unreadable files and folders: ``chmod 000``, and where the tests run as
root (who may read anything) the same refusal is injected where the operating system would give it
(``open``, ``io.open`` and ``os.scandir`` raising ``PermissionError`` for those paths only).
"""

from __future__ import annotations

import builtins
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qmambair import cli
from qmambair.cli import main, register_command
from qmambair.data import read_image, write_image
from qmambair.errors import UsageError, UserError
from qmambair.models import build_model
from qmambair.models.checkpoint import save_model
from qmambair.train.checkpoint import atomic_save, training_checkpoint

RNG = np.random.default_rng(0)
ERROR_LINE = re.compile(r"^qmambair [a-z]+: error: \S")


def rgb(h: int = 5, w: int = 7) -> np.ndarray:
    return RNG.random((h, w, 3), dtype=np.float32)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``qmambair ARGV`` (argparse's own errors exit through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_error_line(err: str, *words: str) -> str:
    """The error line (the last line; argparse puts its usage above it), with no traceback anywhere."""
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert ERROR_LINE.match(line), err
    for word in words:
        assert word in line, (word, line)
    return line


@pytest.fixture(scope="module")
def x2_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("light-sr-x2", embed_dim=12, depths=(1,), d_state=4)
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny_x2.safetensors")


@pytest.fixture
def deny_read(monkeypatch):
    """``deny_read(path)``: make a file unreadable or a folder unlistable, as for a user without rights."""
    denied: set[str] = set()
    real_open, real_scandir = builtins.open, os.scandir

    def fake_open(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and os.path.abspath(file) in denied:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def fake_scandir(path="."):
        if os.path.abspath(path) in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    modes: dict[Path, int] = {}

    def deny(path: Path) -> None:
        modes[path] = path.stat().st_mode
        path.chmod(0)
        denied.add(os.path.abspath(path))
        if os.geteuid() == 0:  # root reads anything: inject what the OS gives an ordinary user
            monkeypatch.setattr(builtins, "open", fake_open)
            monkeypatch.setattr(io, "open", fake_open)  # what pathlib uses
            monkeypatch.setattr(os, "scandir", fake_scandir)

    yield deny
    for path, mode in modes.items():
        path.chmod(mode)


# ----------------------------------------------------------------------------------- train / qat options


@pytest.fixture
def fake_train(monkeypatch):
    """Replace the training loop: records the configs it was given (the checks before it are under test)."""
    calls = []

    def train(config, resume=False, progress=True):
        calls.append((config, resume))
        return {"step": 0, "seconds": 0.0}

    monkeypatch.setattr("qmambair.train.trainer.train", train)
    return calls



BAD_TRAIN_OPTIONS = [
    (["--preset", "nosuch"], 1, ["unknown preset 'nosuch'"]),
    (["--set", "model.emb_dim=7"], 1, ["model.emb_dim", "embed_dim"]),
    (["--set", "quant.bitz=2"], 1, ["quant.bitz", "bits"]),
    (["--set", "model.embed_dim=abc"], 1, ["model.embed_dim", "'abc'", "integer"]),
    (["--set", "degradation.scal=3"], 1, ["degradation.scal", "scale"]),
    (["--set", "degradation.sigm=50"], 1, ["degradation.sigm", "sigma"]),
    (["--set", "iters=2.5"], 1, ["iters", "2.5"]),
    (["--set", "nosuch=1"], 1, ["nosuch"]),
    (["--set", "model=5"], 1, ["option model"]),
    (["--set", "quant.bits=5"], 1, ["bits"]),
    (["--set", "lr=-1"], 1, ["lr"]),
    (["--set", "degradation.scale=3"], 1, ["x2", "x3"]),
    (["--patch", "63"], 1, ["patch 63", "multiple"]),
    (["--batch", "-2"], 2, ["--batch", "-2"]),
    (["--batch", "0"], 2, ["--batch", "0"]),
    (["--patch", "-8"], 2, ["--patch", "-8"]),
    (["--threads", "-1"], 2, ["--threads", "-1"]),
    (["--iters", "abc"], 2, ["--iters", "'abc'"]),
    (["--device", "bogus"], 1, ["'bogus'", "device"]),
    (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], 1, ["cuda", "CUDA"]),
]


@pytest.mark.parametrize(("options", "code", "words"), BAD_TRAIN_OPTIONS,
                         ids=[" ".join(o) for o, _, _ in BAD_TRAIN_OPTIONS])
def test_bad_train_options_refused_before_any_file_is_written(tmp_path, monkeypatch, capsys, options, code,
                                                               words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    before = snapshot(tmp_path)
    got, err = run(["train", "--preset", "light-sr-x2", "--out", "run", "-q", *options], capsys)
    assert got == code, err
    assert_one_error_line(err, *words)
    assert snapshot(tmp_path) == before  # no run folder, no runs/, nothing changed


YAML_FILES = [
    ("lr: [1\n  iters: 3\n", ["broken.yaml", "not valid YAML", "line 2"]),
    ("model: 5\n", ["option model"]),
    ("training: [1, 2]\n", ["broken.yaml", "mapping"]),
    ("- 1\n- 2\n", ["broken.yaml", "mapping"]),
    ("itres: 3\n", ["itres"]),
    ("quant:\n  bitz: 2\n", ["quant.bitz"]),
    ("degradation: {scal: 3}\n", ["degradation.scal"]),
]


@pytest.mark.parametrize(("text", "words"), YAML_FILES, ids=[t.splitlines()[0] for t, _ in YAML_FILES])
def test_bad_config_file_refused(tmp_path, monkeypatch, capsys, text, words):
    monkeypatch.chdir(tmp_path)
    Path("broken.yaml").write_text(text)
    before = snapshot(tmp_path)
    code, err = run(["train", "--config", "broken.yaml", "--out", "run"], capsys)
    assert code == 1
    assert_one_error_line(err, *words)
    assert snapshot(tmp_path) == before


def test_missing_or_unreadable_config(tmp_path, monkeypatch, capsys, deny_read, fake_train):
    monkeypatch.chdir(tmp_path)
    code, err = run(["train", "--config", "nofile.yaml", "--out", "run"], capsys)
    assert code == 1 and "nofile.yaml" in assert_one_error_line(err, "no such file")
    Path("secret.yaml").write_text("iters: 3\n")
    deny_read(tmp_path / "secret.yaml")
    code, err = run(["train", "--config", "secret.yaml", "--out", "run"], capsys)
    assert code == 1 and "secret.yaml" in assert_one_error_line(err, "ermission denied")
    assert not Path("run").exists() and not fake_train


def test_qat_preset_must_fit_the_checkpoint(tmp_path, monkeypatch, capsys, x2_model, fake_train):
    monkeypatch.chdir(tmp_path)
    before = snapshot(x2_model.parent)
    code, err = run(["qat", "--from", str(x2_model), "--preset", "light-sr-x4", "--out", "run"], capsys)
    assert code == 1
    assert_one_error_line(err, "light-sr-x4", "light-sr-x2", "x2", "x4")
    code, err = run(["qat", "--from", str(x2_model), "--preset", "nosuch", "--out", "run"], capsys)
    assert code == 1 and "nosuch" in assert_one_error_line(err)
    code, err = run(["qat", "--from", str(x2_model), "--method", "minmax", "--out", "run"], capsys)
    assert code == 1 and "post-training" in assert_one_error_line(err)
    code, err = run(["qat", "--from", str(x2_model), "--set", "quant.bitz=2", "--out", "run"], capsys)
    assert code == 1 and "quant.bitz" in assert_one_error_line(err)
    assert not (tmp_path / "run").exists() and snapshot(x2_model.parent) == before and not fake_train
    # a preset of the checkpoint's scale and channels is taken: its degradation is the one trained on
    assert run(["qat", "--from", str(x2_model), "--preset", "classic-sr-x2", "--out", "run"], capsys)[0] == 0
    assert fake_train[0][0].preset == "classic-sr-x2"
    assert fake_train[0][0].degradation == {"type": "bicubic", "scale": 2}


@pytest.mark.parametrize("existing", ["model.safetensors", "best.pt", "log.jsonl"])
def test_train_out_with_an_earlier_run_is_refused(tmp_path, capsys, fake_train, existing):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / existing).write_bytes(b"an earlier run's file")
    before = snapshot(tmp_path)
    argv = ["train", "--preset", "light-sr-x2", "--out", str(run_dir), "-q"]
    code, err = run(argv, capsys)
    assert code == 1 and not fake_train
    assert_one_error_line(err, existing, "--overwrite")
    assert snapshot(tmp_path) == before
    assert run([*argv, "--overwrite"], capsys)[0] == 0 and len(fake_train) == 1


def test_train_out_with_last_pt_needs_resume(tmp_path, capsys, fake_train, x2_model):
    run_dir = tmp_path / "run"
    model = build_model("light-sr-x2", embed_dim=12, depths=(1,), d_state=4)
    atomic_save(training_checkpoint(model, {"preset": "light-sr-x2"}, 3), run_dir / "last.pt")
    (run_dir / "best.pt").write_bytes(b"best")
    before = snapshot(tmp_path)
    base = ["train", "--preset", "light-sr-x2", "--out", str(run_dir), "-q"]
    for extra in ([], ["--overwrite"]):
        code, err = run([*base, *extra], capsys)
        assert code == 1 and "--resume" in assert_one_error_line(err, "last.pt")
    assert snapshot(tmp_path) == before and not fake_train
    assert run([*base, "--resume"], capsys)[0] == 0  # resuming is what last.pt is for
    assert fake_train[0][1] is True
    code, err = run(["train", "--out", str(tmp_path / "empty"), "--resume", "-q"], capsys)
    assert code == 1 and "no last.pt" in assert_one_error_line(err)


def test_train_out_is_a_file(tmp_path, capsys, fake_train):
    (tmp_path / "run").write_text("not a folder")
    code, err = run(["train", "--preset", "light-sr-x2", "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "is a file" in assert_one_error_line(err)
    assert (tmp_path / "run").read_text() == "not a folder"


# ----------------------------------------------------------------------------------------------- export


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished run's folder: last.pt (a training checkpoint) and model.safetensors."""
    run = tmp_path / "run"
    model = build_model("light-sr-x2", embed_dim=12, depths=(1,), d_state=4)
    atomic_save(training_checkpoint(model, {"preset": "light-sr-x2"}, 3), run / "last.pt")
    save_model(model, run / "model.safetensors")
    return run


@pytest.mark.parametrize("target", [["-o", "model.safetensors"], ["-o", "last.pt"], ["--onnx", "last.pt"],
                                    ["--onnx", "model.safetensors"], ["-o", "out.onnx"]])
def test_export_never_writes_over_the_run(run_dir, capsys, target):
    before = snapshot(run_dir)
    option, name = target
    code, err = run(["export", str(run_dir / "last.pt"), option, str(run_dir / name), "--overwrite"], capsys)
    assert code == 2
    assert_one_error_line(err, option, name, ".qmb" if option == "-o" else ".onnx")
    assert snapshot(run_dir) == before


@pytest.fixture(scope="module")
def packed_model(tmp_path_factory) -> Path:
    """A tiny 2-bit LSQ model as a packed .qmb file."""
    from qmambair.quant.calibrate import initialize_quantizers
    from qmambair.quant.convert import QuantConfig, quantize_model
    from qmambair.quant.pack import export_packed

    torch.manual_seed(0)
    model = quantize_model(build_model("light-sr-x2", embed_dim=12, depths=(1,), d_state=4),
                           QuantConfig(method="lsq", bits=2))
    initialize_quantizers(model, torch.rand(1, 3, 8, 8))
    return export_packed(model.eval(), tmp_path_factory.mktemp("packed") / "tiny.qmb")


def test_export_refuses_existing_output_and_its_own_input(tmp_path, capsys, packed_model):
    packed = tmp_path / "model.qmb"
    shutil.copy(packed_model, packed)
    (tmp_path / "taken.qmb").write_bytes(b"someone's file")
    (tmp_path / "link.qmb").symlink_to(packed)
    before = snapshot(tmp_path)
    code, err = run(["export", str(packed), "-o", str(tmp_path / "taken.qmb")], capsys)
    assert code == 1 and "taken.qmb" in assert_one_error_line(err, "exists", "--overwrite")
    for target in (packed, tmp_path / "link.qmb"):
        code, err = run(["export", str(packed), "-o", str(target), "--overwrite"], capsys)
        assert code == 1
        assert_one_error_line(err, "input")
    code, err = run(["export", str(packed), "-o", str(tmp_path)], capsys)
    assert code == 2  # a folder is not a .qmb file name
    code, err = run(["export", str(packed), "-o", str(tmp_path / "taken.qmb" / "x.qmb")], capsys)
    assert code == 1 and "taken.qmb" in assert_one_error_line(err)  # parent is a file: OS error, one line
    code, err = run(["export", str(packed)], capsys)
    assert code == 2 and "nothing to write" in assert_one_error_line(err)
    assert snapshot(tmp_path) == before
    code, err = run(["export", str(packed), "-o", str(tmp_path / "taken.qmb"), "--overwrite"], capsys)
    assert code == 0, err
    assert (tmp_path / "taken.qmb").read_bytes()[:4] == packed.read_bytes()[:4]


# ---------------------------------------------------------------------------------------------- restore


@pytest.mark.parametrize(("options", "words"), [
    (["--tile", "abc"], ["--tile", "'abc'", "integer"]),
    (["--tile", "1"], ["--tile", ">= 2"]),
    (["--tile", "8", "--tile-mode", "blend", "--overlap", "8"], ["--overlap", "smaller"]),
    (["--tile", "8", "--tile-mode", "blend", "--overlap", "12"], ["--overlap", "smaller"]),
    (["--overlap", "2"], ["--overlap", "blend"]),
    (["--threads", "0"], ["--threads"]),
    (["--threads", "-1"], ["--threads"]),
])
def test_restore_options_checked_before_the_model_is_loaded(tmp_path, capsys, options, words):
    src = write_image(tmp_path / "a.png", rgb())
    # the model does not exist: the option error must come first, once
    code, err = run(["restore", str(src), "-o", str(tmp_path / "out"), "-m", "nope.pth", *options], capsys)
    assert code == 2
    line = assert_one_error_line(err, *words)
    assert "_positive" not in err and "nope.pth" not in err, line
    assert not (tmp_path / "out").exists()


def test_restore_device_errors(tmp_path, capsys, x2_model):
    src = write_image(tmp_path / "a.png", rgb())
    for device in ("bogus", "cuda:99" if torch.cuda.is_available() else "cuda"):
        code, err = run(["restore", str(src), "-o", str(tmp_path / "o"), "-m", str(x2_model), "--device",
                         device], capsys)
        assert code == 1
        assert_one_error_line(err, "--device", device)
    assert not (tmp_path / "o").exists()


def test_restore_threads(tmp_path, capsys, x2_model):
    src = write_image(tmp_path / "a.png", rgb())
    before = torch.get_num_threads()
    try:
        code, _ = run(["restore", str(src), "-o", str(tmp_path / "o"), "-m", str(x2_model), "-q", "--threads",
                       "1"], capsys)
        assert code == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert read_image(tmp_path / "o" / "a.png").shape == (10, 14, 3)


def test_restore_reports_unreadable_inputs_and_restores_the_rest(tmp_path, capsys, x2_model, deny_read):
    folder = tmp_path / "in"
    write_image(folder / "good.png", rgb())
    write_image(folder / "secret.png", rgb())
    write_image(folder / "sub" / "deep.png", rgb())
    write_image(folder / "locked" / "hidden.png", rgb())
    single = write_image(tmp_path / "single.png", rgb())
    deny_read(folder / "secret.png")
    deny_read(folder / "locked")
    out = tmp_path / "out"
    code, err = run(["restore", str(folder), str(single), "-o", str(out), "-m", str(x2_model), "-q", "-r"],
                    capsys)
    assert code == 1
    assert "Traceback" not in err
    assert next(ln for ln in err.splitlines() if "secret.png" in ln).count("ermission denied") == 1
    assert "ermission denied" in next(ln for ln in err.splitlines() if "locked" in ln)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "good.png", "single.png", "sub/deep.png"]
    assert "restored 3, skipped 0, failed 2" in err


def test_restore_unreadable_input_folder(tmp_path, capsys, x2_model, deny_read):
    good = write_image(tmp_path / "ok" / "a.png", rgb())
    locked = tmp_path / "locked"
    write_image(locked / "b.png", rgb())
    deny_read(locked)
    code, err = run(["restore", str(locked), str(good.parent), "-o", str(tmp_path / "out"), "-m",
                     str(x2_model), "-q"], capsys)
    assert code == 1 and (tmp_path / "out" / "a.png").exists()
    assert "ermission denied" in next(ln for ln in err.splitlines() if "locked" in ln)
    code, err = run(["restore", str(locked), "-o", str(tmp_path / "out2"), "-m", str(x2_model), "-q"], capsys)
    assert code == 1 and "no input images" in assert_one_error_line(err)


def test_gifs_in_folders_and_animated_gifs(tmp_path, capsys, x2_model):
    folder = tmp_path / "in"
    folder.mkdir()
    frames = [Image.fromarray((rgb() * 255).astype(np.uint8)) for _ in range(3)]
    frames[0].save(folder / "still.gif")
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = tmp_path / "out"
    code, err = run(["restore", str(folder), "-o", str(out), "-m", str(x2_model), "-q"], capsys)
    assert code == 1
    assert read_image(out / "still.png").shape == (10, 14, 3)  # found inside the folder, as when named
    assert not (out / "anim.png").exists()
    line = next(ln for ln in err.splitlines() if "anim.gif" in ln)
    assert "animation (3 frames)" in line
    code, err = run(["restore", str(folder / "anim.gif"), "-o", str(tmp_path / "o2"), "-m", str(x2_model),
                     "-q"], capsys)
    assert code == 1 and "animation" in err and not (tmp_path / "o2" / "anim.png").exists()


def test_restore_output_is_an_existing_file(tmp_path, capsys, x2_model):
    a, b = write_image(tmp_path / "a.png", rgb()), write_image(tmp_path / "b.png", rgb())
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, err = run(["restore", str(a), str(b), "-o", str(tmp_path / "notes.txt"), "-m", str(x2_model)],
                    capsys)
    assert code == 1 and "notes.txt" in assert_one_error_line(err, "is a file")
    code, err = run(["restore", str(a), "-o", str(tmp_path / "x.gif"), "-m", str(x2_model)], capsys)
    assert code == 2 and ".gif" in assert_one_error_line(err)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------- model files


def test_unreadable_safetensors_says_permission_denied(tmp_path, capsys, x2_model, deny_read):
    model = tmp_path / "m.safetensors"
    shutil.copy(x2_model, model)
    deny_read(model)
    src = write_image(tmp_path / "a.png", rgb())
    for argv in (["info", str(model)], ["restore", str(src), "-o", str(tmp_path / "o"), "-m", str(model)]):
        code, err = run(argv, capsys)
        assert code == 1
        line = assert_one_error_line(err, str(model), "permission denied")
        assert "No such file" not in line
    assert not (tmp_path / "o").exists()


def test_pth_without_a_state_dict_names_the_file(tmp_path, capsys):
    path = tmp_path / "weights.pth"
    torch.save({"epoch": 3, "note": "no tensors here"}, path)
    code, err = run(["info", str(path)], capsys)
    assert code == 1
    assert_one_error_line(err, str(path), "state dict")


def test_model_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
    (tmp_path / "junk.pth").write_bytes(b"junk" * 10)
    for name, words in [("empty.safetensors", ["empty"]), ("junk.safetensors", ["safetensors"]),
                        ("junk.pth", ["PyTorch"]), ("missing.pth", ["no such file"])]:
        code, err = run(["info", str(tmp_path / name)], capsys)
        assert code == 1
        assert_one_error_line(err, name, *words)
    code, err = run(["info", str(tmp_path)], capsys)
    assert code == 1 and "folder" in assert_one_error_line(err)


def test_other_commands_are_behind_the_boundary(tmp_path, capsys):
    code, err = run(["test", str(tmp_path / "nothing"), "-m", str(tmp_path / "none.safetensors")], capsys)
    assert code in (1, 2)
    assert_one_error_line(err)
    code, err = run(["demo", "--crop", "-1"], capsys)
    assert code == 2 and "--crop" in assert_one_error_line(err)
    code, err = run(["benchmark", "--batch", "0"], capsys)
    assert code == 2 and "--batch" in assert_one_error_line(err)


# ---------------------------------------------------------------------------------------------- the boundary


@pytest.fixture
def command(capsys):
    """``command(raiser)``: register ``qmambair boom`` that calls ``raiser()``; removed afterwards."""
    added = []

    def make(raiser):
        def add_boom_parser(sub):
            sub.add_parser("boom").set_defaults(func=lambda args: raiser())

        register_command(add_boom_parser)
        added.append(add_boom_parser)

    yield make
    for adder in added:
        cli.COMMANDS.remove(adder)


def _raise(exc: BaseException):
    def raiser():
        raise exc

    return raiser


@pytest.mark.parametrize(("exc", "code", "words"), [
    (UserError("the thing is wrong"), 1, ["the thing is wrong"]),
    (UsageError("--foo needs --bar"), 2, ["--foo needs --bar"]),
    (PermissionError(13, "Permission denied", "/x/y.qmb"), 1, ["/x/y.qmb: permission denied"]),
    (IsADirectoryError(21, "Is a directory", "/x/dir"), 1, ["/x/dir: is a directory"]),
    (OSError(28, "No space left on device", "/x/big"), 1, ["/x/big: no space left on device"]),
    (UserError("two\nlines"), 1, ["two lines"]),
])
def test_user_errors_are_one_line(command, capsys, exc, code, words):
    command(_raise(exc))
    got, err = run(["boom"], capsys)
    assert got == code
    assert_one_error_line(err, *words)
    assert len(err.strip().splitlines()) == 1


def test_library_value_errors_are_user_errors(command, capsys):
    from qmambair.data.datasets import Degradation

    command(lambda: Degradation(kind="blur"))  # qmambair's own check of a value
    code, err = run(["boom"], capsys)
    assert code == 1 and "blur" in assert_one_error_line(err)


@pytest.mark.parametrize("exc", [KeyError("x"), TypeError("bad call"), AttributeError("nope"),
                                 ValueError("raised outside qmambair"), RuntimeError("kernel")])
def test_bugs_show_the_traceback_and_ask_for_a_report(command, capsys, exc):
    command(_raise(exc))
    code, err = run(["boom"], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err and str(exc.args[0]) in err
    assert "bug" in err.splitlines()[-1] and "report" in err.splitlines()[-1]


def test_traceback_of_a_user_error_on_request(command, capsys, monkeypatch):
    command(_raise(UserError("wrong")))
    monkeypatch.setenv("QMAMBAIR_TRACEBACK", "1")
    code, err = run(["boom"], capsys)
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1] == "qmambair boom: error: wrong"
