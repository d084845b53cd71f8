"""The MVTec AD layout reader. (All files fabricated in tmp_path.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from clipfusion.data import (
    MVTEC_CATEGORIES,
    MVTecAD,
    load_image,
)
from clipfusion.errors import ConfigError, InputError
from fabricate import make_mvtec_category, random_rgb, save_image


def test_mvtec_reads_layout_pairs_masks_and_returns_rgb_for_grayscale_categories(tmp_path):
    make_mvtec_category(tmp_path, "grid", gray=True, defects=("bent", "broken"))
    (tmp_path / "grid" / "train" / "good" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "grid" / "train" / "good" / "notes.txt").write_text("not an image")
    save_image(tmp_path / "grid" / "train" / "good" / "003.PNG", random_rgb(99)[..., 0])

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
    make_mvtec_category(tmp_path, "bottle")
    test = MVTecAD(tmp_path, "bottle", "test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        test[0].label = 0  # type: ignore[misc]
    assert list(test[1:3]) == [test[1], test[2]]
    assert test[-1] == list(test)[-1]
    assert "bottle" in repr(test)


def test_mvtec_anomalous_image_without_mask_is_an_error_naming_the_image(tmp_path):
    make_mvtec_category(tmp_path, "screw")
    (tmp_path / "screw" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(InputError, match=r"001\.png.*without a ground-truth mask"):
        MVTecAD(tmp_path, "screw", "test")
    assert len(MVTecAD(tmp_path, "screw", "train")) == 3  # the train split needs no masks


def test_mvtec_rejects_unknown_category_bad_split_and_wrong_root(tmp_path):
    make_mvtec_category(tmp_path, "bottle")
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
