"""``qmambair restore`` / ``info`` run in-process on tiny saved models and tiny image files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qmambair import cli
from qmambair.cli import build_parser, main, register_command
from qmambair.commands.info import format_info, model_info
from qmambair.data import image_info, read_image, write_image
from qmambair.models import build_model
from qmambair.models.checkpoint import save_model

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("light-sr-x2", embed_dim=12, depths=(1,), d_state=4)
    return str(save_model(model, tmp_path_factory.mktemp("models") / "tiny_x2.safetensors"))


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("jpeg-gray-q10", embed_dim=12, depths=(1,), d_state=4)
    return str(save_model(model, tmp_path_factory.mktemp("models") / "tiny_grey.safetensors"))


def rgb(h=5, w=7, c=3):
    return RNG.random((h, w, c), dtype=np.float32)


def test_single_file_into_folder_and_file(tmp_path, sr_model, capsys):
    src = write_image(tmp_path / "in" / "a.png", rgb())
    assert main(["restore", str(src), "-o", str(tmp_path / "out"), "--model", sr_model, "-q"]) == 0
    out = read_image(tmp_path / "out" / "a.png")
    assert out.shape == (10, 14, 3)
    assert "restored 1, skipped 0, failed 0" in capsys.readouterr().err
    assert main(["restore", str(src), "-o", str(tmp_path / "b.png"), "-m", sr_model, "-q"]) == 0
    np.testing.assert_array_equal(read_image(tmp_path / "b.png"), out)


def test_folder_recursive_and_suffix(tmp_path, sr_model):
    write_image(tmp_path / "in" / "a.png", rgb())
    write_image(tmp_path / "in" / "sub" / "b.jpg", rgb(4, 6))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    base = ["restore", str(tmp_path / "in"), "-o", str(out), "-m", sr_model, "-q", "--suffix", "_x2"]
    assert main(base) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a_x2.png"]
    assert main([*base, "-r"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a_x2.png", "sub/b_x2.png"]
    assert read_image(out / "sub" / "b_x2.png").shape == (8, 12, 3)


def test_bad_inputs_reported_and_skipped(tmp_path, sr_model, capsys):
    folder = tmp_path / "in"
    write_image(folder / "good.png", rgb())
    (folder / "empty.png").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (folder / "text.jpg").write_text("hello, I am not a JPEG\n")
    code = main(["restore", str(folder), str(tmp_path / "missing.png"), "-o", str(tmp_path / "out"),
                 "-m", sr_model, "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert (tmp_path / "out" / "good.png").exists()
    assert not (tmp_path / "out" / "empty.png").exists()
    for name, words in [("empty.png", "empty"), ("corrupt.png", "corrupt"), ("text.jpg", "text file"),
                        ("missing.png", "no such file")]:
        line = next(line for line in err.splitlines() if name in line)
        assert words in line, line
    assert "restored 1, skipped 0, failed 4" in err


def test_16bit_png_gives_16bit_output(tmp_path, sr_model):
    src = write_image(tmp_path / "deep.png", rgb(), bits=16)
    assert image_info(src).bits == 16
    assert main(["restore", str(src), "-o", str(tmp_path / "out"), "-m", sr_model, "-q"]) == 0
    assert image_info(tmp_path / "out" / "deep.png").bits == 16
    assert main(["restore", str(src), "-o", str(tmp_path / "o8"), "-m", sr_model, "-q", "--bits", "8"]) == 0
    assert image_info(tmp_path / "o8" / "deep.png").bits == 8


def test_rgba_alpha_resized_and_reattached(tmp_path, sr_model):
    img = rgb(c=4)
    img[..., 3] = 0.5
    img[:2, :, 3] = 1.0
    src = write_image(tmp_path / "rgba.png", img)
    assert main(["restore", str(src), "-o", str(tmp_path / "out"), "-m", sr_model, "-q"]) == 0
    out, alpha = read_image(tmp_path / "out" / "rgba.png", mode="keep", alpha="keep")
    assert out.shape == (10, 14, 3) and alpha is not None and alpha.shape == (10, 14)
    assert abs(alpha[-1, 5] - 0.5) < 0.01 and abs(alpha[0, 5] - 1.0) < 0.01
    assert main(["restore", str(src), "-o", str(tmp_path / "d"), "-m", sr_model, "-q", "--drop-alpha"]) == 0
    assert not image_info(tmp_path / "d" / "rgba.png").has_alpha


def test_grey_and_rgb_channel_matching(tmp_path, sr_model, grey_model):
    grey = write_image(tmp_path / "grey.png", rgb(c=1))
    assert main(["restore", str(grey), "-o", str(tmp_path / "o1"), "-m", sr_model, "-q"]) == 0
    info = image_info(tmp_path / "o1" / "grey.png")
    assert (info.channels, info.height, info.width) == (1, 10, 14)
    colour = write_image(tmp_path / "colour.png", rgb())
    assert main(["restore", str(colour), "-o", str(tmp_path / "o2"), "-m", grey_model, "-q"]) == 0
    info = image_info(tmp_path / "o2" / "colour.png")
    assert (info.channels, info.height, info.width) == (1, 5, 7)


def test_never_overwrites_inputs_unless_asked(tmp_path, sr_model, capsys):
    folder = tmp_path / "imgs"
    src = write_image(folder / "a.png", rgb())
    before = src.read_bytes()
    assert main(["restore", str(folder), "-o", str(folder), "-m", sr_model, "-q"]) == 1
    assert "would replace input" in capsys.readouterr().err
    assert src.read_bytes() == before
    assert main(["restore", str(folder), "-o", str(folder), "-m", sr_model, "-q", "--overwrite-input"]) == 0
    assert read_image(src).shape == (10, 14, 3)


def test_existing_output_skipped_unless_overwrite(tmp_path, sr_model, capsys):
    src = write_image(tmp_path / "a.png", rgb())
    dst = write_image(tmp_path / "out" / "a.png", np.zeros((2, 2, 3), np.float32))
    assert main(["restore", str(src), "-o", str(tmp_path / "out"), "-m", sr_model, "-q"]) == 0
    assert "skipped" in capsys.readouterr().err and read_image(dst).shape == (2, 2, 3)
    assert main(["restore", str(src), "-o", str(tmp_path / "out"), "-m", sr_model, "-q", "--overwrite"]) == 0
    assert read_image(dst).shape == (10, 14, 3)


def test_colliding_output_names_fail(tmp_path, sr_model, capsys):
    write_image(tmp_path / "in" / "a.png", rgb())
    write_image(tmp_path / "in" / "a.jpg", rgb())
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", sr_model, "-q"]) == 1
    assert "also the output of" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["mambair", "blend"])
def test_tiled_restore(tmp_path, sr_model, mode):
    src = write_image(tmp_path / "a.png", rgb(9, 11))
    args = ["restore", str(src), "-o", str(tmp_path / "out"), "-m", sr_model, "-q", "--tile", "4",
            "--tile-mode", mode]
    assert main(args) == 0
    assert read_image(tmp_path / "out" / "a.png").shape == (18, 22, 3)


def test_errors_and_help(tmp_path, capsys):
    assert main([]) == 2
    assert main(["restore", str(tmp_path), "-o", str(tmp_path / "o"), "-m", "light-sr-x2"]) == 1
    assert "no input images" in capsys.readouterr().err
    write_image(tmp_path / "a.png", rgb())
    assert main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "-m", "nope.pth"]) == 1
    assert "nope.pth" in capsys.readouterr().err
    one = ["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o")]
    assert main([*one, "-m", "x", "--overlap", "2"]) == 2
    assert "--overlap" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", "light-sr-x2", "--size", "axb"])


def test_info_text_and_json(sr_model, capsys):
    assert main(["info", sr_model, "--size", "8x6"]) == 0
    text = capsys.readouterr().out
    model = build_model("light-sr-x2", embed_dim=12, depths=(1,), d_state=4)
    params = sum(p.numel() for p in model.parameters())
    assert f"{params:,}" in text and "MACs" in text and "8x6 -> output 16x12" in text
    assert "quantization: none" in text
    assert main(["info", sr_model, "--size", "8x6", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == params and data["macs"]["scan"] == 4 * 14 * 48 * (5 * 4 + 1)
    assert data["output_size"] == [16, 12]


def test_info_default_size_and_quantized_model():
    model = build_model("light-sr-x4", embed_dim=12, depths=(1,), d_state=4)
    model.quant_config = {"method": "qmambair", "bits": 4}
    info = model_info(model)
    assert info["input_size"] == [180, 320] and info["output_size"] == [720, 1280]
    assert info["quant_config"] == {"method": "qmambair", "bits": 4}
    assert "bits=4" in format_info("m", info)


def test_parser_is_extensible(capsys):
    def add_hello_parser(sub):
        p = sub.add_parser("hello", help="say hello")
        p.add_argument("--name", default="world")
        p.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)

    register_command(add_hello_parser)
    try:
        assert "hello" in build_parser().format_help()
        assert main(["hello", "--name", "lead"]) == 0
        assert capsys.readouterr().out.strip() == "hello lead"
    finally:
        cli.COMMANDS.remove(add_hello_parser)
