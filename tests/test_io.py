"""Image io: format round trips, bit depths, alpha, palettes, EXIF, clear errors, atomic protected writes."""

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from qmambair.data import (
    ImageInfo,
    ImageReadError,
    ProtectedPathError,
    builtin_images,
    image_info,
    list_builtin,
    png16,
    read_image,
    rgb_to_gray,
    write_image,
)
from qmambair.data import io as qio


def _img(shape=(13, 17, 3), seed=0):
    """Random float image already on the 8-bit grid, so lossless formats round-trip exactly."""
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.float32) / 255


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff", ".webp"])
def test_lossless_round_trip(tmp_path, suffix):
    img = _img()
    path = write_image(tmp_path / f"x{suffix}", img)
    back = read_image(path)
    assert back.dtype == np.float32 and back.shape == img.shape
    np.testing.assert_array_equal(back, img)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg"])
def test_jpeg_round_trip(tmp_path, suffix):
    smooth = np.linspace(0, 1, 32 * 32 * 3).reshape(32, 32, 3).astype(np.float32)
    back = read_image(write_image(tmp_path / f"x{suffix}", smooth, quality=95))
    assert back.shape == smooth.shape
    assert np.abs(back - smooth).mean() < 0.01


def test_grey_round_trip_and_modes(tmp_path):
    g = _img((11, 9, 1))
    p = write_image(tmp_path / "g.png", g)
    with Image.open(p) as im:
        assert im.mode == "L"
    np.testing.assert_array_equal(read_image(p, mode="keep"), g)
    np.testing.assert_array_equal(read_image(p, mode="gray"), g)
    rgb = read_image(p)  # default "rgb" replicates
    assert rgb.shape == (11, 9, 3)
    np.testing.assert_array_equal(rgb, np.repeat(g, 3, axis=2))
    c = _img((11, 9, 3), 1)
    pc = write_image(tmp_path / "c.png", c)
    gray = read_image(pc, mode="gray")
    expected = c[..., 0] * 0.299 + c[..., 1] * 0.587 + c[..., 2] * 0.114
    np.testing.assert_allclose(gray[..., 0], expected, atol=1e-6)
    np.testing.assert_array_equal(rgb_to_gray(c), gray)


def test_16bit_png(tmp_path):
    rng = np.random.default_rng(3)
    for channels in (1, 3, 4):
        u16 = rng.integers(0, 65536, (10, 12, channels), dtype=np.uint16)
        p = write_image(tmp_path / f"c{channels}.png", u16, bits=16)
        with Image.open(p) as im:  # an independent decoder sees the upper bytes of our samples
            hi = np.asarray(im)
        expected_hi = u16 if channels == 1 else (u16 >> 8).astype(np.uint8)  # Pillow keeps 16-bit grey only
        np.testing.assert_array_equal(hi.reshape(u16.shape), expected_hi)
        img, alpha = read_image(p, mode="keep", alpha="keep")
        colour = u16[..., :3] if channels == 4 else u16
        np.testing.assert_allclose(img, colour / 65535.0, atol=1e-7, rtol=0)
        if channels == 4:
            np.testing.assert_allclose(alpha, u16[..., 3] / 65535.0, atol=1e-7, rtol=0)
        else:
            assert alpha is None
        assert image_info(p).bits == 16
    # a float image written at 16 bits keeps 16-bit precision
    f = rng.random((8, 8, 3))
    back = read_image(write_image(tmp_path / "f.png", f, bits=16))
    np.testing.assert_allclose(back, f, atol=0.5 / 65535 + 1e-7)


def test_16bit_grey_alpha_png(tmp_path):
    la = np.random.default_rng(8).integers(0, 65536, (7, 9, 2), dtype=np.uint16)
    p = write_image(tmp_path / "la.png", la, bits=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full precision, no fallback warning
        img, alpha = read_image(p, mode="keep", alpha="keep")
    np.testing.assert_allclose(img[..., 0], la[..., 0] / 65535, atol=1e-7, rtol=0)
    np.testing.assert_allclose(alpha, la[..., 1] / 65535, atol=1e-7, rtol=0)
    assert image_info(p) == ImageInfo(height=7, width=9, bits=16, channels=1, has_alpha=True, format="PNG")


def test_16bit_fallback_warns_and_keeps_8_bits(tmp_path, monkeypatch):
    u16 = np.random.default_rng(9).integers(0, 65536, (4, 5, 3), dtype=np.uint16)
    p = write_image(tmp_path / "c.png", u16, bits=16)
    monkeypatch.setitem(png16._LOW_BYTE_RAWMODE, "RGB;16B", "no-such-rawmode")
    with pytest.warns(UserWarning, match="8-bit precision"):
        img = read_image(p)
    np.testing.assert_allclose(img, (u16 >> 8) / 255, atol=1e-7)


def test_16bit_grey_png_written_by_pillow(tmp_path):
    u16 = np.array([[0, 1, 256, 65535], [1000, 30000, 40000, 65534]], dtype=np.uint16)
    Image.fromarray(u16).save(tmp_path / "g16.png")
    np.testing.assert_allclose(read_image(tmp_path / "g16.png", mode="keep")[..., 0], u16 / 65535, atol=1e-7)


def test_16bit_colour_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    u16 = np.random.default_rng(4).integers(0, 65536, (9, 7, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c16.tif", u16)
    np.testing.assert_allclose(read_image(tmp_path / "c16.tif"), u16 / 65535, atol=1e-7, rtol=0)


def test_rgba_alpha_dropped_with_warning_or_kept(tmp_path):
    rgba = _img((6, 5, 4), 5)
    rgba[0, 0, 3] = 128 / 255
    p = write_image(tmp_path / "a.png", rgba)
    with pytest.warns(UserWarning, match="alpha"):
        img = read_image(p)
    np.testing.assert_array_equal(img, rgba[..., :3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img2, alpha = read_image(p, alpha="keep")
        np.testing.assert_array_equal(img2, rgba[..., :3])
        np.testing.assert_array_equal(alpha, rgba[..., 3])
        opaque = rgba.copy()
        opaque[..., 3] = 1.0
        read_image(write_image(tmp_path / "o.png", opaque))  # fully opaque alpha: dropped silently


def test_grey_alpha_8bit_and_formats_without_alpha(tmp_path):
    la = _img((5, 6, 2), 10)
    la[0, 0, 1] = 0.0
    for suffix in (".png", ".tif", ".webp"):
        img, alpha = read_image(write_image(tmp_path / f"la{suffix}", la), mode="keep", alpha="keep")
        np.testing.assert_array_equal(img[..., 0], la[..., 0])  # colour under transparent pixels kept
        np.testing.assert_array_equal(alpha, la[..., 1])
    for suffix in (".jpg", ".bmp"):
        with pytest.raises(ValueError, match="alpha"):
            write_image(tmp_path / f"rgba{suffix}", _img((4, 4, 4)))


def test_image_info(tmp_path):
    p = write_image(tmp_path / "c.png", _img((13, 17, 3)))
    info = image_info(p)
    assert (info.height, info.width, info.bits, info.channels, info.has_alpha, info.format) == (
        13,
        17,
        8,
        3,
        False,
        "PNG",
    )
    g = image_info(write_image(tmp_path / "g.png", _img((5, 4, 1)), bits=16))
    assert (g.bits, g.channels, g.has_alpha) == (16, 1, False)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (10, 6)).save(tmp_path / "r.jpg", exif=exif)
    r = image_info(tmp_path / "r.jpg")
    assert (r.height, r.width, r.format) == (10, 6, "JPEG")
    with pytest.raises(ImageReadError, match="nope.png"):
        image_info(tmp_path / "nope.png")


def test_palette_images(tmp_path):
    idx = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 9)
    im = Image.fromarray(idx, mode="P")
    im.putpalette(palette)
    im.save(tmp_path / "p.png")
    colours = np.array(palette[:9], dtype=np.float32).reshape(3, 3) / 255
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), colours[idx])
    im.save(tmp_path / "pt.png", transparency=1)
    img, alpha = read_image(tmp_path / "pt.png", alpha="keep")
    np.testing.assert_array_equal(img, colours[idx])
    np.testing.assert_array_equal(alpha, (idx != 1).astype(np.float32))


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    img = read_image(tmp_path / "cmyk.jpg")
    assert img.shape == (6, 8, 3)
    assert img[..., 0].mean() > 0.8 and img[..., 1:].mean() < 0.2  # red


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(tmp_path, orientation):
    arr = (np.random.default_rng(6).random((6, 10, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(arr).save(p, exif=exif, quality=95)
    with Image.open(p) as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = read_image(p)
    assert got.shape == upright.shape
    assert got.shape[:2] == ((10, 6) if orientation >= 5 else (6, 10))
    np.testing.assert_array_equal(got, upright.astype(np.float32) / 255)


def test_read_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageReadError, match="missing.png.*no such file"):
        read_image(missing)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.png.*empty"):
        read_image(empty)
    text = tmp_path / "list.png"
    text.write_text("img001.png\nimg002.png\n")
    with pytest.raises(ImageReadError, match="list.png.*text file"):
        read_image(text)
    good = write_image(tmp_path / "good.png", _img((64, 64, 3)))
    data = good.read_bytes()
    corrupt = tmp_path / "cut.png"
    corrupt.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png.*corrupt"):
        read_image(corrupt)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ImageReadError, match="garbage.jpg"):
        read_image(garbage)
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)
    assert issubclass(ImageReadError, ValueError)


def test_write_is_atomic_and_creates_folders(tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "out.png"
    write_image(out, _img())
    assert sorted(os.listdir(out.parent)) == ["out.png"]
    before = out.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(qio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_image(out, _img(seed=9))
    monkeypatch.undo()
    assert sorted(os.listdir(out.parent)) == ["out.png"]  # no temp file left, old file intact
    assert out.read_bytes() == before
    with pytest.raises(ValueError, match="alpha"):
        write_image(out.with_suffix(".jpg"), _img((4, 4, 4)))
    assert sorted(os.listdir(out.parent)) == ["out.png"]


def test_protected_and_overwrite(tmp_path):
    src = write_image(tmp_path / "in.png", _img())
    before = src.read_bytes()
    with pytest.raises(ProtectedPathError, match="in.png"):
        write_image(src, _img(seed=2), protect=[src])
    (tmp_path / "sub").mkdir()
    with pytest.raises(ProtectedPathError):  # same file, spelled differently
        write_image(tmp_path / "sub" / ".." / "in.png", _img(seed=2), protect=[str(src)])
    assert src.read_bytes() == before
    with pytest.raises(FileExistsError):
        write_image(src, _img(seed=2), overwrite=False)
    write_image(src, _img(seed=2))  # not protected: replaced on purpose
    assert src.read_bytes() != before


def test_write_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="suffix"):
        write_image(tmp_path / "x.gif", _img())
    with pytest.raises(ValueError, match="16-bit"):
        write_image(tmp_path / "x.jpg", _img(), bits=16)
    bad = _img()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_image(tmp_path / "x.png", bad)
    with pytest.raises(TypeError):
        write_image(tmp_path / "x.png", np.zeros((4, 4, 3), dtype=np.uint16))  # uint16 needs bits=16
    assert not list(tmp_path.iterdir())


def test_write_clips_floats_and_accepts_tensors(tmp_path):
    img = _img((5, 6, 3), 7)
    over = img.copy()
    over[0, 0] = [1.5, -0.2, 0.5]
    back = read_image(write_image(tmp_path / "c.png", over))
    np.testing.assert_allclose(back[0, 0], [1.0, 0.0, 128 / 255], atol=1e-7)
    t = torch.from_numpy(img).permute(2, 0, 1)
    np.testing.assert_array_equal(read_image(write_image(tmp_path / "t.png", t[None])), img)


def test_builtin_images():
    names = list_builtin()
    assert {"astronaut", "camera", "coffee", "aero"} <= set(names)
    assert set(list_builtin(color=True)) | set(list_builtin(color=False)) == set(names)
    imgs = builtin_images(["astronaut", "camera"])
    assert list(imgs) == ["astronaut", "camera"]
    for img in imgs.values():
        assert img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3
        assert 0 <= img.min() and img.max() <= 1
    gray = builtin_images(["astronaut", "camera"], gray=True)
    assert gray["astronaut"].shape == (512, 512, 1)
    np.testing.assert_array_equal(gray["camera"][..., 0], imgs["camera"][..., 0])
    gray["camera"][:] = 0  # fresh arrays: the cache is not modified
    assert builtin_images(["camera"])["camera"].max() > 0
    with pytest.raises(KeyError, match="unknown"):
        builtin_images(["lena"])


def test_every_builtin_image_loads_offline():
    for name, img in builtin_images().items():
        assert img.shape[0] >= 256 and img.shape[1] >= 256, name
        assert img.std() > 0.02, name
