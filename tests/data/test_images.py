"""Reading images and masks the same way whatever wrote them. (All files fabricated in tmp_path.)"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfusion.data import (
    load_image,
    load_mask,
)
from clipfusion.errors import ClipfusionError, ConfigError, InputError
from fabricate import png_16bit_rgb, random_rgb, save_image


def test_load_image_scales_16_bit_grayscale_instead_of_clipping(tmp_path):
    values = np.array([[0, 1000, 32896, 65535]], np.uint16)
    path = save_image(tmp_path / "gray16.png", values)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 4, 128, 255]


def test_load_image_reads_16_bitrandom_rgb(tmp_path):
    values = np.zeros((3, 4, 3), np.uint16)
    values[..., 0], values[..., 1], values[..., 2] = 65535, 32896, 300
    path = tmp_path / "rgb48.png"
    path.write_bytes(png_16bit_rgb(values))
    out = np.asarray(load_image(path))
    assert out.shape == (3, 4, 3)
    assert out[0, 0].tolist() == [255, 128, 1]


def test_load_image_handles_32_bit_and_float_grayscale(tmp_path):
    path_i = tmp_path / "int32.tif"
    Image.fromarray(np.array([[0, 65535]], np.int32), mode="I").save(path_i)
    assert np.asarray(load_image(path_i))[0, :, 1].tolist() == [0, 255]
    path_f = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F").save(path_f)
    assert np.asarray(load_image(path_f))[0, :, 2].tolist() == [0, 128, 255]


def test_load_image_palette_alpha_and_cmyk(tmp_path):
    palette_img = Image.new("P", (4, 2))
    palette_img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette_img.putdata([0, 1, 2, 1, 0, 1, 2, 1])
    palette_img.save(tmp_path / "palette.png")
    out = np.asarray(load_image(tmp_path / "palette.png"))
    assert out[0, 1].tolist() == [255, 0, 0] and out[0, 2].tolist() == [0, 0, 255]

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[0, 0, 3] = 0  # fully transparent: the colour is kept, alpha dropped
    rgba[1, 1, 3] = 255
    save_image(tmp_path / "rgba.png", rgba)
    out = load_image(tmp_path / "rgba.png")
    assert out.mode == "RGB" and np.all(np.asarray(out) == (10, 200, 30))

    la = Image.fromarray(np.full((2, 3), 77, np.uint8)).convert("LA")
    la.save(tmp_path / "la.png")
    assert np.all(np.asarray(load_image(tmp_path / "la.png")) == 77)

    cmyk = Image.new("CMYK", (5, 4), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "cmyk.tif")
    out = load_image(tmp_path / "cmyk.tif")
    assert out.mode == "RGB" and out.size == (5, 4) and np.asarray(out)[0, 0].tolist() == [255, 0, 0]
    cmyk.save(tmp_path / "cmyk.jpg")
    assert load_image(tmp_path / "cmyk.jpg").mode == "RGB"


def test_load_image_applies_exif_orientation(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high
    array[:, :20] = (250, 0, 0)  # left half red, right half blue
    array[:, 20:] = (0, 0, 250)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, exif=exif, quality=95)
    assert Image.open(path).size == (40, 20)

    out = load_image(path)
    assert out.size == (20, 40)
    pixels = np.asarray(out).astype(int)
    # after a clockwise turn the red left half is on top
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60


def _assert_one_line_error_naming(path: Path, call) -> InputError:
    with pytest.raises(InputError) as info:
        call(path)
    message = str(info.value)
    assert path.name in message and "\n" not in message
    assert isinstance(info.value, ClipfusionError)
    return info.value


@pytest.mark.parametrize("loader", [load_image, load_mask], ids=["image", "mask"])
def test_bad_files_raise_one_clear_error_naming_the_file(tmp_path, loader):
    err = _assert_one_line_error_naming(tmp_path / "missing.png", loader)
    assert "not found" in str(err)

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "empty" in str(_assert_one_line_error_naming(empty, loader))

    buffer = io.BytesIO()
    Image.fromarray(random_rgb(3, (64, 64))).save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "truncated" in str(_assert_one_line_error_naming(truncated, loader))

    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n" * 10)
    assert "not an image" in str(_assert_one_line_error_naming(text, loader))

    folder = tmp_path / "folder.png"
    folder.mkdir()
    _assert_one_line_error_naming(folder, loader)

    jpeg = io.BytesIO()
    Image.fromarray(random_rgb(4, (64, 64))).save(jpeg, format="JPEG")
    cut_jpeg = tmp_path / "cut.jpg"
    cut_jpeg.write_bytes(jpeg.getvalue()[:200])
    _assert_one_line_error_naming(cut_jpeg, loader)


def test_load_image_refuses_decompression_bombs(tmp_path, monkeypatch):
    import clipfusion.data.images as images

    path = save_image(tmp_path / "big.png", random_rgb(0, (64, 64)))
    monkeypatch.setattr(images, "MAX_PIXELS", 100)  # 4096 pixels > 100
    with pytest.raises(InputError, match=r"big\.png: image too large \(64×64 pixels"):
        load_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_large_images_are_reduced_not_refused(tmp_path, monkeypatch, suffix):
    import clipfusion.data.images as images

    monkeypatch.setattr(images, "MAX_SIDE", 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own bomb limit no longer applies
    path = save_image(tmp_path / f"wide{suffix}", random_rgb(0, (128, 64)))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (32, 16)


def test_min_side_refuses_images_too_small_for_the_models(tmp_path):
    path = save_image(tmp_path / "tiny.png", random_rgb(0, (40, 20)))
    assert load_image(path).size == (40, 20)
    with pytest.raises(InputError, match=r"tiny\.png: image too small \(40×20 pixels; at least 32"):
        load_image(path, min_side=32)


def test_load_image_bytes_decodes_and_checks_as_load_image(tmp_path, monkeypatch):
    """An upload (bytes in memory) gets the same conversions and the same one-line errors as a file, with
    the name it was given, and nothing is written to disk."""
    import clipfusion.data.images as images
    from clipfusion.data.images import ImageTooLargeError, load_image_bytes

    for mode in ("RGB", "L", "P", "RGBA", "CMYK"):
        path = save_image(
            tmp_path / f"{mode}.png" if mode != "CMYK" else tmp_path / "c.jpg", random_rgb(5, (48, 40)), mode
        )
        from_file = load_image(path)
        from_bytes = load_image_bytes(path.read_bytes(), "upload.png")
        assert from_bytes.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(from_bytes), np.asarray(from_file))
    buffer = io.BytesIO()
    Image.fromarray(random_rgb(3, (64, 64))).save(buffer, format="PNG")
    data = buffer.getvalue()
    cases = [
        (b"", "cam.png: empty file (0 bytes)"),
        (b"not an image" * 10, "cam.png: not an image file"),
        (data[: len(data) // 2], "cam.png: truncated or corrupt image data"),
    ]
    for payload, message in cases:
        with pytest.raises(InputError) as info:
            load_image_bytes(payload, "cam.png")
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
        assert not isinstance(info.value, ImageTooLargeError)
    with pytest.raises(InputError, match=r"cam\.png: image too small \(64×64 pixels; at least 100"):
        load_image_bytes(data, "cam.png", min_side=100)
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(ImageTooLargeError, match=r"cam\.png: image too large \(64×64 pixels"):
        load_image_bytes(data, "cam.png")
    with pytest.raises(ImageTooLargeError):  # the file loader raises the same kind (a server answers 413)
        load_image(save_image(tmp_path / "big.png", random_rgb(0, (64, 64))))


# ---------------------------------------------------------------------------------------------- load_mask


def test_load_mask_is_anomalous_wherever_non_zero(tmp_path):
    values = np.array([[0, 1, 2], [0, 255, 0]], np.uint8)
    mask = load_mask(save_image(tmp_path / "m.png", values))
    assert mask.dtype == bool
    assert mask.tolist() == [[False, True, True], [False, True, False]]

    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 1, 2] = 1
    assert load_mask(save_image(tmp_path / "rgb.png", rgb)).tolist() == [[False, True], [False, False]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * (254 * 3))  # index 0 drawn white, 1 black
    palette.putdata([0, 1])
    palette.save(tmp_path / "p.png")
    assert load_mask(tmp_path / "p.png").tolist() == [[False, True]]  # by index, not by colour

    bilevel = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    bilevel.save(tmp_path / "b.png")
    assert load_mask(tmp_path / "b.png").tolist() == [[False, True]]

    assert load_mask(save_image(tmp_path / "m16.png", np.array([[0, 3]], np.uint16))).tolist() == [
        [False, True]
    ]


def test_load_mask_resizes_nearest_to_width_height(tmp_path):
    values = np.zeros((10, 20), np.uint8)  # H=10, W=20
    values[:, 10:] = 3
    path = save_image(tmp_path / "m.png", values)
    mask = load_mask(path, size=(40, 20))
    assert mask.shape == (20, 40) and mask.dtype == bool
    assert not mask[:, :20].any() and mask[:, 20:].all()
    assert load_mask(path, size=(20, 10)).sum() == 100
    small = load_mask(path, size=(3, 7))
    assert small.shape == (7, 3) and set(np.unique(small)) <= {False, True}
    for bad in [(0, 5), (5,), (2.5, 3), "ab"]:
        with pytest.raises(ConfigError):
            load_mask(path, size=bad)  # type: ignore[arg-type]
