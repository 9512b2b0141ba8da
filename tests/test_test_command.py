"""``qmambair test`` and the x8 self-ensemble, on tiny models and tiny benchmark folders made in ``tmp_path``.

Expected scores are computed here from the definitions (docs/evaluation.md §2: 8-bit rounding, border crop,
BT.601 Y = 16 + 65.481 R + 128.553 G + 24.966 B on [0,1], PSNR = 10 log10(255^2 / MSE)) with plain numpy, the
network run directly with torch on the LR files the test wrote, never with the code under test.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qmambair.cli import main
from qmambair.data.degrade import bicubic_lr
from qmambair.data.imresize import imresize
from qmambair.eval.ensemble import self_ensemble
from qmambair.loading import load_model
from qmambair.models.checkpoint import save_model
from qmambair.models.presets import build_model
from qmambair.quant.convert import QuantConfig, quantize_model
from qmambair.quant.pack import export_packed

TINY = {"embed_dim": 12, "depths": (1,), "d_state": 4}

# The eight flips/rotations written out by hand: (transform, its inverse), on the first two axes.
D4 = [
    (lambda a: a, lambda a: a),
    (lambda a: a[:, ::-1], lambda a: a[:, ::-1]),
    (lambda a: a[::-1], lambda a: a[::-1]),
    (lambda a: a[::-1, ::-1], lambda a: a[::-1, ::-1]),
    (lambda a: a.swapaxes(0, 1), lambda a: a.swapaxes(0, 1)),
    (lambda a: a.swapaxes(0, 1)[::-1], lambda a: a[::-1].swapaxes(0, 1)),
    (lambda a: a.swapaxes(0, 1)[:, ::-1], lambda a: a[:, ::-1].swapaxes(0, 1)),
    (lambda a: a.swapaxes(0, 1)[::-1, ::-1], lambda a: a[::-1, ::-1].swapaxes(0, 1)),
]


def _save(tmp_path_factory, preset: str, name: str) -> str:
    torch.manual_seed(0)
    model = build_model(preset, **TINY)
    return str(save_model(model, tmp_path_factory.mktemp("models") / name))


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory):
    return _save(tmp_path_factory, "light-sr-x2", "tiny_x2.safetensors")


@pytest.fixture(scope="module")
def denoise_model(tmp_path_factory):
    return _save(tmp_path_factory, "denoise-color-s25", "tiny_dn25.safetensors")


@pytest.fixture(scope="module")
def jpeg_model(tmp_path_factory):
    return _save(tmp_path_factory, "jpeg-gray-q10", "tiny_jpeg10.safetensors")


# ---- the oracle ---------------------------------------------------------------------------------------


def run_model(path: str, img: np.ndarray) -> np.ndarray:
    """The network on one float HWC image, float32 HWC output (not clamped)."""
    model = load_model(path).eval()
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
        return model(x)[0].permute(1, 2, 0).numpy()


def to_8bit(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img.astype(np.float64), 0, 1) * 255).astype(np.uint8)


def luma(img8: np.ndarray) -> np.ndarray:
    rgb = img8.astype(np.float64) / 255.0
    return 16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


def expected_psnr(out: np.ndarray, hr8: np.ndarray, border: int, y: bool) -> float:
    a, b = to_8bit(out).astype(np.float64), hr8.astype(np.float64)
    if y:
        a, b = luma(to_8bit(out)), luma(hr8)
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    return float(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))


def save_png(path: Path, img8: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img8[..., 0] if img8.ndim == 3 and img8.shape[2] == 1 else img8).save(path)
    return path


def read_csv(path: Path) -> dict[tuple[str, str], tuple[float, float]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["dataset", "image", "psnr", "ssim"]
    return {(r[0], r[1]): (float(r[2]), float(r[3])) for r in rows[1:]}


RNG = np.random.default_rng(1)


def random8(h: int, w: int, c: int = 3) -> np.ndarray:
    """A smooth-ish random 8-bit image (noise plus a gradient), so PSNR values are moderate and distinct."""
    base = np.linspace(0, 180, w)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
    return np.clip(base + RNG.integers(0, 70, (h, w, c)), 0, 255).astype(np.uint8)


def qtest(*args: str) -> int:
    """``qmambair test ARGS -q`` in-process; returns the exit code."""
    return main(["test", *args, "-q"])


def one_error_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert "error:" in lines[0] and all(w in lines[0] for w in words), lines[0]
    return lines[0]


# ---- scores -------------------------------------------------------------------------------------------


def make_edsr_set(root: Path, sizes, scale=2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """NAME/HR + NAME/LR_bicubic/X<s>; the LR files are random (not bicubic of HR), so only reading them
    gives the expected numbers. Returns {image: (modcropped HR, LR)}."""
    images = {}
    for k, (h, w) in enumerate(sizes):
        hr = random8(h, w)
        lr = random8(h // scale, w // scale)
        save_png(root / "HR" / f"img{k}.png", hr)
        save_png(root / "LR_bicubic" / f"X{scale}" / f"img{k}x{scale}.png", lr)
        images[f"img{k}.png"] = (hr[: h // scale * scale, : w // scale * scale], lr)
    return images


def test_csv_psnr_equals_independent_computation_edsr_layout(tmp_path, sr_model):
    images = make_edsr_set(tmp_path / "Set5", [(31, 29), (24, 26), (27, 33)])
    out_csv = tmp_path / "scores.csv"
    assert qtest("-m", sr_model, str(tmp_path / "Set5"), "--csv", str(out_csv)) == 0
    got = read_csv(out_csv)
    want = {n: expected_psnr(run_model(sr_model, lr / 255.0), hr, 2, True) for n, (hr, lr) in images.items()}
    assert set(got) == {("Set5", n) for n in images} | {("Set5", "mean")}
    for name, value in want.items():
        assert got["Set5", name][0] == pytest.approx(value, abs=2e-6)
        assert 0 < got["Set5", name][1] <= 1
    assert got["Set5", "mean"][0] == pytest.approx(np.mean(list(want.values())), abs=2e-6)
    assert got["Set5", "mean"][1] == pytest.approx(np.mean([got["Set5", n][1] for n in images]), abs=2e-6)


def test_plain_folder_makes_bicubic_lr_after_modcrop(tmp_path, sr_model, capsys):
    hrs = {"a.png": random8(33, 27), "b.png": random8(26, 30)}
    for name, hr in hrs.items():
        save_png(tmp_path / "photos" / name, hr)
    assert qtest("-m", sr_model, str(tmp_path / "photos"), "--csv", str(tmp_path / "s.csv")) == 0
    got = read_csv(tmp_path / "s.csv")
    for name, hr in hrs.items():
        crop = hr[: hr.shape[0] // 2 * 2, : hr.shape[1] // 2 * 2]
        value = expected_psnr(run_model(sr_model, bicubic_lr(crop, 2)), crop, 2, True)
        assert got["photos", name][0] == pytest.approx(value, abs=2e-6)
    table = capsys.readouterr().out
    assert "Y channel, border 2" in table and "photos" in table and "made" in table


def test_div2k_layout_and_parent_of_sets_detected(tmp_path, sr_model, capsys):
    div = tmp_path / "DIV2K"
    hr, lr = random8(28, 30), random8(14, 15)
    save_png(div / "DIV2K_valid_HR" / "0801.png", hr)
    save_png(div / "DIV2K_valid_LR_bicubic" / "X2" / "0801x2.png", lr)
    bench = tmp_path / "benchmark"
    set5 = make_edsr_set(bench / "Set5", [(20, 22)])
    set14 = make_edsr_set(bench / "Set14", [(22, 18), (18, 20)])
    out_csv = tmp_path / "all.csv"
    assert qtest("-m", sr_model, str(div), str(bench), "--csv", str(out_csv)) == 0
    got = read_csv(out_csv)
    assert {k[0] for k in got} == {"DIV2K_valid", "Set5", "Set14"}
    assert got["DIV2K_valid", "0801.png"][0] == pytest.approx(
        expected_psnr(run_model(sr_model, lr / 255.0), hr, 2, True), abs=2e-6)
    for name, images in (("Set5", set5), ("Set14", set14)):
        for image, (h, low) in images.items():
            assert got[name, image][0] == pytest.approx(
                expected_psnr(run_model(sr_model, low / 255.0), h, 2, True), abs=2e-6)
    table = capsys.readouterr().out.splitlines()[2:-1]  # header lines, then the "wrote" line
    assert [line.split()[0] for line in table] == ["DIV2K_valid", "Set14", "Set5"]
    assert all(line.split()[2] == "files" for line in table)
    # the HR folder given directly is the same set
    assert qtest("-m", sr_model, str(div / "DIV2K_valid_HR"), "--csv", str(tmp_path / "d.csv")) == 0
    assert read_csv(tmp_path / "d.csv")["DIV2K_valid", "0801.png"] == got["DIV2K_valid", "0801.png"]


def test_colour_denoising_rgb_psnr_seeded_noise_no_border(tmp_path, denoise_model):
    hr = random8(19, 23)
    save_png(tmp_path / "CBSD" / "x.png", hr)
    assert qtest("-m", denoise_model, str(tmp_path / "CBSD"), "--csv", str(tmp_path / "n.csv")) == 0
    clean = hr.astype(np.float32) / 255
    noisy = (clean + np.random.RandomState(0).normal(0, 25 / 255, hr.shape)).astype(np.float32)
    got = read_csv(tmp_path / "n.csv")["CBSD", "x.png"][0]
    assert got == pytest.approx(expected_psnr(run_model(denoise_model, noisy), hr, 0, False), abs=2e-6)
    # --sigma chooses another noise level explicitly
    assert main(["test", "-m", denoise_model, str(tmp_path / "CBSD"), "--sigma", "50", "--csv",
                 str(tmp_path / "n50.csv"), "-q"]) == 0
    noisy50 = (clean + np.random.RandomState(0).normal(0, 50 / 255, hr.shape)).astype(np.float32)
    assert read_csv(tmp_path / "n50.csv")["CBSD", "x.png"][0] == pytest.approx(
        expected_psnr(run_model(denoise_model, noisy50), hr, 0, False), abs=2e-6)


def test_jpeg_grey_psnr_quality_of_the_preset(tmp_path, jpeg_model):
    hr = random8(24, 21, 1)
    save_png(tmp_path / "Classic5" / "g.png", hr)
    assert qtest("-m", jpeg_model, str(tmp_path / "Classic5"), "--csv", str(tmp_path / "j.csv")) == 0
    buf = io.BytesIO()
    Image.fromarray(hr[..., 0]).save(buf, format="JPEG", quality=10)
    jpeg = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32)[..., None] / 255
    got = read_csv(tmp_path / "j.csv")["Classic5", "g.png"][0]
    assert got == pytest.approx(expected_psnr(run_model(jpeg_model, jpeg), hr, 0, False), abs=2e-6)


# ---- self-ensemble -------------------------------------------------------------------------------------


def test_self_ensemble_equals_mean_of_eight_hand_written_transforms():
    rng = np.random.default_rng(3)
    img = rng.random((5, 7, 2)).astype(np.float32)

    def fn(x):  # not symmetric under any flip or rotation, and x2 larger
        up = np.repeat(np.repeat(x, 2, axis=0), 2, axis=1)
        return np.cumsum(up, axis=0) * 0.3 + np.cumsum(up, axis=1) ** 2 * 0.01 + up[..., ::-1]

    want = np.mean([inv(fn(np.ascontiguousarray(t(img)))) for t, inv in D4], axis=0)
    np.testing.assert_allclose(self_ensemble(fn, img), want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(want, fn(img), atol=1e-3)  # the transforms matter for this fn
    grey = img[..., 0]
    want_grey = np.mean([inv(fn(np.ascontiguousarray(t(grey[..., None])))) for t, inv in D4], axis=0)
    np.testing.assert_allclose(self_ensemble(fn, grey[..., None]), want_grey, rtol=1e-6, atol=1e-6)


def test_self_ensemble_option_of_the_command(tmp_path, sr_model):
    images = make_edsr_set(tmp_path / "Set5", [(22, 26)])
    hr, lr = images["img0.png"]
    args = ["test", "-m", sr_model, str(tmp_path / "Set5"), "-q"]
    assert main([*args, "--self-ensemble", "--out", str(tmp_path / "ens")]) == 0
    x = lr / 255.0
    manual = np.mean([inv(run_model(sr_model, np.ascontiguousarray(t(x)))) for t, inv in D4], axis=0)
    saved = np.asarray(Image.open(tmp_path / "ens" / "Set5" / "img0.png"))
    np.testing.assert_array_equal(saved, to_8bit(manual))
    single = run_model(sr_model, x)
    assert not np.array_equal(to_8bit(single), saved)
    got = read_csv(tmp_path / "ens" / "results.csv")["Set5", "img0.png"][0]
    assert got == pytest.approx(expected_psnr(manual, hr, 2, True), abs=2e-6)


# ---- outputs and errors --------------------------------------------------------------------------------


def test_out_saves_scored_images_and_never_overwrites(tmp_path, sr_model, capsys):
    images = make_edsr_set(tmp_path / "Set5", [(20, 24), (18, 22)])
    out, out_csv = tmp_path / "sr", tmp_path / "r.csv"
    args = ["test", "-m", sr_model, str(tmp_path / "Set5"), "--out", str(out), "--csv", str(out_csv), "-q"]
    assert main(args) == 0
    for name, (_, lr) in images.items():
        saved = np.asarray(Image.open(out / "Set5" / name))
        np.testing.assert_array_equal(saved, to_8bit(run_model(sr_model, lr / 255.0)))
    capsys.readouterr()
    stamp = {p: p.read_bytes() for p in [out_csv, *sorted(out.rglob("*.png"))]}
    out_csv.write_text("keep me")
    assert main(args) == 1
    one_error_line(capsys, "exists", "--overwrite")
    assert out_csv.read_text() == "keep me"
    out_csv.unlink()
    assert main(args) == 1  # the images still exist
    one_error_line(capsys, "img0.png", "exists")
    assert not out_csv.exists()
    assert main([*args, "--overwrite"]) == 0
    assert {p: p.read_bytes() for p in stamp} == stamp
    # --out inside a test folder would feed the outputs back as test images
    save_png(tmp_path / "plain" / "a.png", random8(20, 20))
    assert qtest("-m", sr_model, str(tmp_path / "plain"), "--out", str(tmp_path / "plain" / "o")) == 1
    one_error_line(capsys, "inside the test folder")


def test_bad_folders_give_one_clear_error(tmp_path, sr_model, denoise_model, capsys):
    def fails(*args: str) -> None:
        assert qtest("-m", sr_model, *args) == 1

    fails(str(tmp_path / "missing"))
    one_error_line(capsys, "missing", "does not exist")
    (tmp_path / "empty").mkdir()
    fails(str(tmp_path / "empty"))
    one_error_line(capsys, "no images")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("no images here")
    fails(str(tmp_path / "texts"))
    one_error_line(capsys, "no images")
    make_edsr_set(tmp_path / "Set14", [(20, 20), (22, 20)])
    (tmp_path / "Set14" / "LR_bicubic" / "X2" / "img1x2.png").unlink()
    fails(str(tmp_path / "Set14"))
    one_error_line(capsys, "no LR file for img1.png")
    make_edsr_set(tmp_path / "B100", [(20, 20)])
    save_png(tmp_path / "B100" / "LR_bicubic" / "X2" / "img0x2.png", random8(9, 10))
    fails(str(tmp_path / "B100"))
    one_error_line(capsys, "img0x2.png", "expected 10x10")
    fails(str(tmp_path / "B100"), "--scale", "4")
    one_error_line(capsys, "x2", "x4")
    save_png(tmp_path / "small" / "tiny.png", random8(6, 6))
    fails(str(tmp_path / "small"))
    one_error_line(capsys, "tiny.png", "smaller")
    assert qtest("-m", denoise_model, str(tmp_path / "small"), "--scale", "2") == 1
    one_error_line(capsys, "does not upscale")
    make_edsr_set(tmp_path / "a" / "Set5", [(20, 20)])
    make_edsr_set(tmp_path / "b" / "Set5", [(20, 20)])
    fails(str(tmp_path / "a" / "Set5"), str(tmp_path / "b" / "Set5"), "--csv", str(tmp_path / "x.csv"))
    one_error_line(capsys, "two test sets are named Set5")


def test_grey_and_rgba_images_into_an_rgb_model(tmp_path, sr_model):
    grey, rgba = random8(22, 20, 1), random8(20, 24, 4)
    rgba[..., 3] = 255
    save_png(tmp_path / "mixed" / "grey.png", grey)
    save_png(tmp_path / "mixed" / "rgba.png", rgba)
    assert qtest("-m", sr_model, str(tmp_path / "mixed"), "--csv", str(tmp_path / "m.csv")) == 0
    got = read_csv(tmp_path / "m.csv")
    for name, rgb in (("grey.png", np.repeat(grey, 3, axis=2)), ("rgba.png", rgba[..., :3])):
        value = expected_psnr(run_model(sr_model, bicubic_lr(rgb, 2)), rgb, 2, True)  # grey read as RGB
        assert got["mixed", name][0] == pytest.approx(value, abs=2e-6)


def test_packed_quantized_model(tmp_path):
    torch.manual_seed(0)
    model = quantize_model(build_model("light-sr-x2", **TINY), QuantConfig(bits=2)).train()
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16))  # initialise the quantizers
    path = str(export_packed(model.eval(), tmp_path / "w2a2.qmb"))
    hr = random8(24, 28)
    save_png(tmp_path / "one" / "p.png", hr)
    assert qtest("-m", path, str(tmp_path / "one"), "--csv", str(tmp_path / "q.csv")) == 0
    value = expected_psnr(run_model(path, bicubic_lr(hr, 2)), hr, 2, True)
    assert read_csv(tmp_path / "q.csv")["one", "p.png"][0] == pytest.approx(value, abs=2e-6)


@pytest.mark.parametrize("mode", ["mambair", "blend"])
def test_tile_options_reach_the_tiler(tmp_path, sr_model, mode):
    from qmambair.eval.tiling import restore_tiled  # tested against MambaIR's tester in tests/test_tiling.py

    images = make_edsr_set(tmp_path / "Set5", [(30, 34)])
    _, lr = images["img0.png"]
    assert qtest("-m", sr_model, str(tmp_path / "Set5"), "--tile", "8", "--tile-mode", mode,
                 "--out", str(tmp_path / "t")) == 0
    with torch.no_grad():
        x = torch.from_numpy(lr.astype(np.float32) / 255).permute(2, 0, 1)[None]
        want = restore_tiled(load_model(sr_model), x, mode=mode, tile=8)[0].permute(1, 2, 0).numpy()
    saved = np.asarray(Image.open(tmp_path / "t" / "Set5" / "img0.png"))
    np.testing.assert_array_equal(saved, to_8bit(want))
    assert not np.array_equal(saved, to_8bit(run_model(sr_model, lr / 255.0)))  # tiling changed the output


@pytest.mark.parametrize(("options", "words"), [
    (["--tile", "1"], "--tile must be >= 2"),
    (["--sigma", "5", "--quality", "30"], "not both"),
    (["--quality", "101"], "1..100"),
])
def test_bad_options_are_usage_errors(tmp_path, sr_model, capsys, options, words):
    save_png(tmp_path / "p" / "a.png", random8(20, 20))
    assert qtest("-m", sr_model, str(tmp_path / "p"), *options) == 2
    one_error_line(capsys, words)


# ---- named sets, centre crops and the bicubic baseline -------------------------------------------------


def centre_crop_pair(hr8: np.ndarray, crop: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(LR, HR) of the centre crop: LR made from the whole (modcropped) image, then both cut at the same
    place (crop // scale LR pixels per side, centred on the LR grid)."""
    hr8 = hr8[: hr8.shape[0] // scale * scale, : hr8.shape[1] // scale * scale]
    lr = bicubic_lr(hr8, scale)
    h, w = (min(crop, n) // scale for n in hr8.shape[:2])
    y, x = (lr.shape[0] - h) // 2, (lr.shape[1] - w) // 2
    return lr[y : y + h, x : x + w], hr8[y * scale : (y + h) * scale, x * scale : (x + w) * scale]


def test_builtin_set_with_centre_crops(tmp_path, sr_model, monkeypatch, capsys):
    from qmambair.data.builtin import builtin_raw, list_builtin

    monkeypatch.setenv("QMAMBAIR_CACHE", str(tmp_path / "cache"))
    out_csv = tmp_path / "b.csv"
    assert qtest("-m", sr_model, "@builtin", "--crop", "40", "--csv", str(out_csv)) == 0
    got = read_csv(out_csv)
    names = list_builtin()
    assert set(got) == {("builtin", f"{n}.png") for n in names} | {("builtin", "mean")}
    for name in ("astronaut", "camera"):  # colour, and grey read as RGB
        pixels = builtin_raw(name)
        rgb = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
        lr, hr = centre_crop_pair(rgb, 40, 2)
        assert hr.shape[:2] == (40, 40)
        value = expected_psnr(run_model(sr_model, lr), hr, 2, True)
        assert got["builtin", f"{name}.png"][0] == pytest.approx(value, abs=2e-6)
    assert "centre crops of 40 px" in capsys.readouterr().out
    # a damaged cached copy is replaced by the built-in pixels, not scored
    save_png(tmp_path / "cache" / "builtin" / "astronaut.png", random8(50, 50))
    assert qtest("-m", sr_model, "@builtin", "--crop", "40", "--csv", str(out_csv), "--overwrite") == 0
    assert read_csv(out_csv)["builtin", "astronaut.png"] == got["builtin", "astronaut.png"]


def test_bicubic_baseline_model(tmp_path, capsys):
    hrs = {"a.png": random8(33, 27), "b.png": random8(24, 30)}
    for name, hr in hrs.items():
        save_png(tmp_path / "photos" / name, hr)
    out_csv = str(tmp_path / "s.csv")
    assert qtest("-m", "bicubic", "--scale", "3", str(tmp_path / "photos"), "--csv", out_csv) == 0
    got = read_csv(tmp_path / "s.csv")
    for name, hr in hrs.items():
        crop = hr[: hr.shape[0] // 3 * 3, : hr.shape[1] // 3 * 3]
        up = imresize(bicubic_lr(crop, 3).astype(np.float64), 3.0)  # MATLAB imresize, tested on its own
        assert got["photos", name][0] == pytest.approx(expected_psnr(up, crop, 3, True), abs=2e-6)
    capsys.readouterr()
    assert qtest("-m", "bicubic", str(tmp_path / "photos")) == 2
    one_error_line(capsys, "bicubic", "--scale")


def test_pool_set_needs_the_fetched_pool(tmp_path, sr_model, monkeypatch, capsys):
    monkeypatch.setenv("QMAMBAIR_CACHE", str(tmp_path / "empty-cache"))
    assert qtest("-m", sr_model, "@pool") == 1
    one_error_line(capsys, "qmambair data fetch")
    assert qtest("-m", sr_model, "@nothing") == 1
    one_error_line(capsys, "@builtin", "@pool")


def test_an_unstable_model_is_scored_nan_with_a_warning_not_a_crash(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("light-sr-x2", **TINY)
    with torch.no_grad():
        model.upsample[0].bias[0] = float("inf")  # one sub-pixel of the red channel becomes inf
    path = str(save_model(model, tmp_path / "unstable.safetensors"))
    images = make_edsr_set(tmp_path / "Set5", [(20, 24), (18, 22)])
    out, out_csv = tmp_path / "sr", tmp_path / "r.csv"
    assert qtest("-m", path, str(tmp_path / "Set5"), "--out", str(out), "--csv", str(out_csv)) == 0
    err = capsys.readouterr().err
    assert "NaN or inf values on 2 of 2 images" in err and "Traceback" not in err
    got = read_csv(out_csv)
    assert len(got) == 3 and all(np.isnan(v) for pair in got.values() for v in pair)
    for name, (_, lr) in images.items():
        raw = run_model(path, lr / 255.0)
        assert not np.isfinite(raw).all()
        saved = np.asarray(Image.open(out / "Set5" / name))
        np.testing.assert_array_equal(saved, to_8bit(np.nan_to_num(raw, nan=0.0, posinf=1.0, neginf=0.0)))
