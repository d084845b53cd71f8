"""The VisA reader (official split_csv/1cls.csv). (All files fabricated in tmp_path.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipfusion.data import (
    VISA_CATEGORIES,
    VisA,
    load_image,
    load_mask,
)
from clipfusion.errors import ConfigError, InputError
from fabricate import random_rgb, save_image

_VISA_HEADER = "object,split,label,image,mask\n"


def _make_visa(root: Path, extra_rows: str = "") -> None:
    rows = []
    for i in range(2):
        path = f"candle/Data/Images/Normal/{i:04d}.JPG"
        save_image(root / path, random_rgb(i), quality=95)
        rows.append(f"candle,train,normal,{path},")
    path = "candle/Data/Images/Normal/0100.JPG"
    save_image(root / path, random_rgb(5), quality=95)
    rows.append(f"candle,test,normal,{path},")
    for i in range(2):
        path = f"candle/Data/Images/Anomaly/{i:03d}.JPG"
        mask_path = f"candle/Data/Masks/Anomaly/{i:03d}.png"
        save_image(root / path, random_rgb(50 + i), quality=95)
        mask = np.zeros((12, 16), np.uint8)
        mask[1:4, 1:4] = 1  # VisA masks hold region labels, not 255
        mask[6:9, 8:12] = 2
        save_image(root / mask_path, mask)
        rows.append(f"candle,test,anomaly,{path},{mask_path}")
    save_image(root / "pcb1/Data/Images/Normal/0000.JPG", random_rgb(7), quality=95)
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
    save_image(tmp_path / "outside.png", random_rgb(1))
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
