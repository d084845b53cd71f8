"""Data sets, image/mask loading, reference sampling and object names (all files fabricated in tmp_path)."""

from __future__ import annotations

import dataclasses
import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfusion.data import (
    MVTEC_CATEGORIES,
    VISA_CATEGORIES,
    FolderDataset,
    MVTecAD,
    Sample,
    VisA,
    load_image,
    load_mask,
    object_name,
    sample_references,
)
from clipfusion.errors import ClipfusionError, ConfigError, InputError

# ---------------------------------------------------------------------------------------------- helpers


def _save(path: Path, array: np.ndarray, mode: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path, **kwargs)
    return path


def _rgb(seed: int, size: tuple[int, int] = (16, 12)) -> np.ndarray:
    w, h = size
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_16bit_rgb(array: np.ndarray) -> bytes:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _make_mvtec_category(root: Path, category: str, *, gray: bool = False, defects=("crack",)) -> None:
    def image(seed: int) -> np.ndarray:
        rgb = _rgb(seed)
        return rgb[..., 0] if gray else rgb

    for i in range(3):
        _save(root / category / "train" / "good" / f"{i:03d}.png", image(i))
    for i in range(2):
        _save(root / category / "test" / "good" / f"{i:03d}.png", image(10 + i))
    for d, defect in enumerate(defects):
        for i in range(2):
            _save(root / category / "test" / defect / f"{i:03d}.png", image(20 + 10 * d + i))
            mask = np.zeros((12, 16), np.uint8)
            mask[2:5, 3 + i : 8] = 255
            _save(root / category / "ground_truth" / defect / f"{i:03d}_mask.png", mask)


# ---------------------------------------------------------------------------------------------- MVTec AD


def test_mvtec_reads_layout_pairs_masks_and_returns_rgb_for_grayscale_categories(tmp_path):
    _make_mvtec_category(tmp_path, "grid", gray=True, defects=("bent", "broken"))
    (tmp_path / "grid" / "train" / "good" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "grid" / "train" / "good" / "notes.txt").write_text("not an image")
    _save(tmp_path / "grid" / "train" / "good" / "003.PNG", _rgb(99)[..., 0])

    train = MVTecAD(tmp_path, "grid", "train")
    assert (train.root, train.category, train.split) == (tmp_path, "grid", "train")
    assert [s.image_path.name for s in train] == ["000.png", "001.png", "002.png", "003.PNG"]
    assert all(s.label == 0 and s.mask_path is None and s.defect_type == "good" for s in train)

    test = MVTecAD(tmp_path, "grid", "test")
    assert len(test) == 6
    assert [s.image_path for s in test] == sorted(s.image_path for s in test)
    assert [s.label for s in test] == [1, 1, 1, 1, 0, 0]
    assert {s.defect_type for s in test} == {"bent", "broken", "good"}
    for s in test:
        assert s.category == "grid"
        if s.label:
            expected = tmp_path / "grid" / "ground_truth" / s.defect_type / f"{s.image_path.stem}_mask.png"
            assert s.mask_path == expected
        else:
            assert s.mask_path is None

    gray_file = train[0].image_path
    assert Image.open(gray_file).mode == "L"
    loaded = load_image(gray_file)
    assert loaded.mode == "RGB" and loaded.size == (16, 12)
    channels = np.asarray(loaded)
    assert np.array_equal(channels[..., 0], np.asarray(Image.open(gray_file)))
    assert np.array_equal(channels[..., 0], channels[..., 2])


def test_mvtec_samples_are_frozen_and_the_dataset_is_a_sequence(tmp_path):
    _make_mvtec_category(tmp_path, "bottle")
    test = MVTecAD(tmp_path, "bottle", "test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        test[0].label = 0  # type: ignore[misc]
    assert list(test[1:3]) == [test[1], test[2]]
    assert test[-1] == list(test)[-1]
    assert "bottle" in repr(test)


def test_mvtec_anomalous_image_without_mask_is_an_error_naming_the_image(tmp_path):
    _make_mvtec_category(tmp_path, "screw")
    (tmp_path / "screw" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(InputError, match=r"001\.png.*without a ground-truth mask"):
        MVTecAD(tmp_path, "screw", "test")
    assert len(MVTecAD(tmp_path, "screw", "train")) == 3  # the train split needs no masks


def test_mvtec_rejects_unknown_category_bad_split_and_wrong_root(tmp_path):
    _make_mvtec_category(tmp_path, "bottle")
    with pytest.raises(ConfigError, match="bottle.*zipper"):
        MVTecAD(tmp_path, "bottel", "test")
    with pytest.raises(ConfigError, match="train, test"):
        MVTecAD(tmp_path, "bottle", "val")
    with pytest.raises(InputError, match=r"cable[/\\]train[/\\]good"):
        MVTecAD(tmp_path, "cable", "train")
    with pytest.raises(InputError, match="folder not found"):
        MVTecAD(tmp_path / "nowhere", "bottle", "train")
    for image in (tmp_path / "bottle" / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(InputError, match="no images"):
        MVTecAD(tmp_path, "bottle", "train")


def test_mvtec_knows_the_fifteen_categories():
    assert len(MVTEC_CATEGORIES) == 15 == len(set(MVTEC_CATEGORIES))
    assert {"grid", "screw", "zipper", "metal_nut", "transistor"} <= set(MVTEC_CATEGORIES)


# ---------------------------------------------------------------------------------------------- VisA

_VISA_HEADER = "object,split,label,image,mask\n"


def _make_visa(root: Path, extra_rows: str = "") -> None:
    rows = []
    for i in range(2):
        path = f"candle/Data/Images/Normal/{i:04d}.JPG"
        _save(root / path, _rgb(i), quality=95)
        rows.append(f"candle,train,normal,{path},")
    path = "candle/Data/Images/Normal/0100.JPG"
    _save(root / path, _rgb(5), quality=95)
    rows.append(f"candle,test,normal,{path},")
    for i in range(2):
        path = f"candle/Data/Images/Anomaly/{i:03d}.JPG"
        mask_path = f"candle/Data/Masks/Anomaly/{i:03d}.png"
        _save(root / path, _rgb(50 + i), quality=95)
        mask = np.zeros((12, 16), np.uint8)
        mask[1:4, 1:4] = 1  # VisA masks hold region labels, not 255
        mask[6:9, 8:12] = 2
        _save(root / mask_path, mask)
        rows.append(f"candle,test,anomaly,{path},{mask_path}")
    _save(root / "pcb1/Data/Images/Normal/0000.JPG", _rgb(7), quality=95)
    rows.append("pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text(_VISA_HEADER + "\n".join(rows) + "\n" + extra_rows)


def test_visa_reads_the_official_csv_and_masks_with_small_label_values(tmp_path):
    _make_visa(tmp_path)
    train = VisA(tmp_path, "candle", "train")
    assert (train.category, train.split, len(train)) == ("candle", "train", 2)
    assert all(s.label == 0 and s.mask_path is None for s in train)

    test = VisA(tmp_path, "candle", "test")
    assert sorted(s.label for s in test) == [0, 1, 1]
    anomalous = [s for s in test if s.label]
    assert all(s.defect_type == "anomaly" and s.mask_path is not None for s in anomalous)
    assert [s.image_path for s in test] == sorted(s.image_path for s in test)

    mask = load_mask(anomalous[0].mask_path)
    assert mask.dtype == bool and mask.shape == (12, 16)
    assert mask.sum() == 9 + 12
    assert mask[2, 2] and mask[7, 10] and not mask[0, 0]
    assert load_image(test[0].image_path).mode == "RGB"
    assert len(VisA(tmp_path, "pcb1", "train")) == 1


_ESCAPING_PATHS = ["../outside.png", "candle/../../outside.png", "/etc/passwd.png", "C:/x.png", "..\\x.png"]


@pytest.mark.parametrize("bad_path", _ESCAPING_PATHS)
def test_visa_rejects_paths_that_leave_the_root(tmp_path, bad_path):
    root = tmp_path / "visa"
    _make_visa(root)
    _save(tmp_path / "outside.png", _rgb(1))
    (root / "split_csv" / "1cls.csv").write_text(_VISA_HEADER + f"candle,train,normal,{bad_path},\n")
    with pytest.raises(InputError, match=r"1cls\.csv:2: path .*(absolute|leaves the data set root)"):
        VisA(root, "candle", "train")


def test_visa_rejects_wrong_layouts_and_rows(tmp_path):
    with pytest.raises(InputError, match=r"split_csv[/\\]1cls\.csv: file not found"):
        VisA(tmp_path, "candle", "train")
    _make_visa(tmp_path)
    with pytest.raises(ConfigError, match="candle.*pipe_fryum"):
        VisA(tmp_path, "candles", "train")
    with pytest.raises(InputError, match="no rows for object 'fryum'"):
        VisA(tmp_path, "fryum", "train")

    csv_path = tmp_path / "split_csv" / "1cls.csv"
    good_csv = csv_path.read_text()
    csv_path.write_text("object,split,label,image\ncandle,train,normal,a.png\n")
    with pytest.raises(InputError, match="missing column.*mask"):
        VisA(tmp_path, "candle", "train")
    csv_path.write_text(good_csv + "candle,train,broken,candle/Data/Images/Normal/0000.JPG,\n")
    with pytest.raises(InputError, match="neither 'normal' nor 'anomaly'"):
        VisA(tmp_path, "candle", "train")
    csv_path.write_text(good_csv + "candle,train,normal,candle/Data/Images/Normal/9999.JPG,\n")
    with pytest.raises(InputError, match=r"9999\.JPG not found"):
        VisA(tmp_path, "candle", "train")
    csv_path.write_text(good_csv + "candle,test,anomaly,candle/Data/Images/Normal/0000.JPG,\n")
    with pytest.raises(InputError, match="has no mask path"):
        VisA(tmp_path, "candle", "test")


def test_visa_knows_the_twelve_categories():
    assert len(VISA_CATEGORIES) == 12 == len(set(VISA_CATEGORIES))


# ---------------------------------------------------------------------------------------------- folders


def test_folder_dataset_with_and_without_masks(tmp_path):
    product = tmp_path / "my_widget"
    _make_mvtec_category(tmp_path, "my_widget", defects=("dent", "smudge"))
    for mask in (product / "ground_truth" / "smudge").iterdir():
        mask.unlink()

    train = FolderDataset(product, "train")
    assert (train.category, train.split, len(train)) == ("my_widget", "train", 3)
    test = FolderDataset(product, "test")
    by_defect = {d: [s for s in test if s.defect_type == d] for d in ("dent", "smudge", "good")}
    assert all(s.label == 1 and s.mask_path is not None and s.mask_path.is_file() for s in by_defect["dent"])
    assert all(s.label == 1 and s.mask_path is None for s in by_defect["smudge"])
    assert all(s.label == 0 and s.mask_path is None for s in by_defect["good"])

    import shutil

    shutil.rmtree(product / "ground_truth")
    shutil.rmtree(product / "test" / "good")
    only_defects = FolderDataset(product, "test")
    assert len(only_defects) == 4 and all(s.label == 1 and s.mask_path is None for s in only_defects)

    with pytest.raises(InputError, match=r"test.*folder not found"):
        FolderDataset(tmp_path / "empty_product", "test")
    with pytest.raises(ConfigError):
        FolderDataset(product, "validation")


# ---------------------------------------------------------------------------------------------- load_image


def test_load_image_scales_16_bit_grayscale_instead_of_clipping(tmp_path):
    values = np.array([[0, 1000, 32896, 65535]], np.uint16)
    path = _save(tmp_path / "gray16.png", values)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 4, 128, 255]


def test_load_image_reads_16_bit_rgb(tmp_path):
    values = np.zeros((3, 4, 3), np.uint16)
    values[..., 0], values[..., 1], values[..., 2] = 65535, 32896, 300
    path = tmp_path / "rgb48.png"
    path.write_bytes(_png_16bit_rgb(values))
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
    _save(tmp_path / "rgba.png", rgba)
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
    Image.fromarray(_rgb(3, (64, 64))).save(buffer, format="PNG")
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
    Image.fromarray(_rgb(4, (64, 64))).save(jpeg, format="JPEG")
    cut_jpeg = tmp_path / "cut.jpg"
    cut_jpeg.write_bytes(jpeg.getvalue()[:200])
    _assert_one_line_error_naming(cut_jpeg, loader)


def test_load_image_refuses_decompression_bombs(tmp_path, monkeypatch):
    import clipfusion.data.images as images

    path = _save(tmp_path / "big.png", _rgb(0, (64, 64)))
    monkeypatch.setattr(images, "MAX_PIXELS", 100)  # 4096 pixels > 100
    with pytest.raises(InputError, match=r"big\.png: image too large \(64×64 pixels"):
        load_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_large_images_are_reduced_not_refused(tmp_path, monkeypatch, suffix):
    import clipfusion.data.images as images

    monkeypatch.setattr(images, "MAX_SIDE", 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own bomb limit no longer applies
    path = _save(tmp_path / f"wide{suffix}", _rgb(0, (128, 64)))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (32, 16)


def test_min_side_refuses_images_too_small_for_the_models(tmp_path):
    path = _save(tmp_path / "tiny.png", _rgb(0, (40, 20)))
    assert load_image(path).size == (40, 20)
    with pytest.raises(InputError, match=r"tiny\.png: image too small \(40×20 pixels; at least 32"):
        load_image(path, min_side=32)


# ---------------------------------------------------------------------------------------------- load_mask


def test_load_mask_is_anomalous_wherever_non_zero(tmp_path):
    values = np.array([[0, 1, 2], [0, 255, 0]], np.uint8)
    mask = load_mask(_save(tmp_path / "m.png", values))
    assert mask.dtype == bool
    assert mask.tolist() == [[False, True, True], [False, True, False]]

    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 1, 2] = 1
    assert load_mask(_save(tmp_path / "rgb.png", rgb)).tolist() == [[False, True], [False, False]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * (254 * 3))  # index 0 drawn white, 1 black
    palette.putdata([0, 1])
    palette.save(tmp_path / "p.png")
    assert load_mask(tmp_path / "p.png").tolist() == [[False, True]]  # by index, not by colour

    bilevel = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    bilevel.save(tmp_path / "b.png")
    assert load_mask(tmp_path / "b.png").tolist() == [[False, True]]

    assert load_mask(_save(tmp_path / "m16.png", np.array([[0, 3]], np.uint16))).tolist() == [[False, True]]


def test_load_mask_resizes_nearest_to_width_height(tmp_path):
    values = np.zeros((10, 20), np.uint8)  # H=10, W=20
    values[:, 10:] = 3
    path = _save(tmp_path / "m.png", values)
    mask = load_mask(path, size=(40, 20))
    assert mask.shape == (20, 40) and mask.dtype == bool
    assert not mask[:, :20].any() and mask[:, 20:].all()
    assert load_mask(path, size=(20, 10)).sum() == 100
    small = load_mask(path, size=(3, 7))
    assert small.shape == (7, 3) and set(np.unique(small)) <= {False, True}
    for bad in [(0, 5), (5,), (2.5, 3), "ab"]:
        with pytest.raises(ConfigError):
            load_mask(path, size=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- sampling


def _samples(n: int) -> list[Sample]:
    return [Sample(Path(f"/data/x/train/good/{i:03d}.png"), 0, None, "good", "x") for i in range(n)]


def test_sample_references_is_deterministic_and_ignores_input_order():
    items = _samples(20)
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    first = sample_references(items, 4, seed=0)
    assert first == sample_references(shuffled, 4, seed=0) == sample_references(tuple(items), 4, seed=0)
    assert len(first) == 4 == len(set(first))
    assert [s.image_path for s in first] == sorted(s.image_path for s in first)
    assert first == [items[i] for i in sorted(np.random.default_rng(0).choice(20, 4, replace=False))]
    draws = {tuple(s.image_path.name for s in sample_references(items, 4, seed=seed)) for seed in range(5)}
    assert len(draws) == 5  # seeds 0..4 give five different reference sets
    assert sample_references(items, 20, seed=3) == items


def test_sample_references_limits():
    items = _samples(3)
    with pytest.raises(InputError, match="asked for 4 .* only 3"):
        sample_references(items, 4, seed=0)
    assert sample_references(items, 0, seed=0) == []
    assert sample_references([], 0, seed=0) == []
    with pytest.raises(ConfigError):
        sample_references(items, -1, seed=0)
    with pytest.raises(ConfigError):
        sample_references(items, 1.5, seed=0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("category", "name"),
    [
        ("metal_nut", "metal nut"),
        ("bottle", "bottle"),
        ("pcb1", "printed circuit board"),
        ("pcb4", "printed circuit board"),
        ("macaroni2", "macaroni"),
        ("pipe_fryum", "pipe fryum"),
        ("chewinggum", "chewing gum"),
        ("woven_fabric", "woven fabric"),
    ],
)
def test_object_name_mapping(category, name):
    assert object_name(category) == name


def test_object_name_overrides_win():
    assert object_name("pcb1", {"pcb1": "circuit board"}) == "circuit board"
    assert object_name("metal_nut", {"pcb1": "circuit board"}) == "metal nut"
    assert object_name("metal_nut", None) == "metal nut"
    assert {object_name(c) for c in MVTEC_CATEGORIES + VISA_CATEGORIES}.isdisjoint({""})
