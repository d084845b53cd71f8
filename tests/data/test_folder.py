"""A user's own product folder in the MVTec layout. (All files fabricated in tmp_path.)"""

from __future__ import annotations

import pytest

from clipfusion.data import (
    FolderDataset,
)
from clipfusion.errors import ConfigError, InputError
from fabricate import make_mvtec_category


def test_folder_dataset_with_and_without_masks(tmp_path):
    product = tmp_path / "my_widget"
    make_mvtec_category(tmp_path, "my_widget", defects=("dent", "smudge"))
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
