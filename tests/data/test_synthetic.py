"""The synthetic data set: layout, exact masks, determinism, and defects that are plain to see."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from clipfusion.data import (
    SYNTHETIC_CATEGORIES,
    SYNTHETIC_DEFECTS,
    FolderDataset,
    load_image,
    load_mask,
    make_synthetic_dataset,
    object_name,
)
from clipfusion.errors import ConfigError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fixture_layout_loads_with_folder_dataset(synthetic_root):
    assert sorted(p.name for p in synthetic_root.iterdir()) == sorted(SYNTHETIC_CATEGORIES)
    assert {"woven_fabric", "grainy_leather", "bottle_cap", "metal_plate"} == set(SYNTHETIC_CATEGORIES)
    for category in SYNTHETIC_CATEGORIES:
        train = FolderDataset(synthetic_root / category, "train")
        test = FolderDataset(synthetic_root / category, "test")
        assert (train.category, len(train), len(test)) == (category, 8, 12)
        assert all(s.label == 0 for s in train)
        assert sum(s.label for s in test) == 6
        assert {s.defect_type for s in test} == {"good", *SYNTHETIC_DEFECTS}
        assert all((s.mask_path is not None) == bool(s.label) for s in test)
        assert not (synthetic_root / category / "ground_truth" / "good").exists()
        image = load_image(test[0].image_path)
        assert image.size == (128, 128) and image.mode == "RGB"
        assert object_name(category) == category.replace("_", " ")


def test_masks_are_exact_binary_and_sized_like_obvious_defects(synthetic_root):
    for category in SYNTHETIC_CATEGORIES:
        for sample in FolderDataset(synthetic_root / category, "test"):
            if not sample.label:
                continue
            raw = np.asarray(Image.open(sample.mask_path))
            assert raw.shape == (128, 128) and raw.dtype == np.uint8
            assert set(np.unique(raw)) == {0, 255}, sample.mask_path
            fraction = float(np.mean(raw == 255))
            assert 0.005 <= fraction <= 0.1, (sample.mask_path, fraction)


def test_defects_differ_clearly_from_the_surface_around_them(synthetic_root):
    """A nearest-neighbour detector on random features can only find what differs in colour or texture."""
    for category in SYNTHETIC_CATEGORIES:
        for sample in FolderDataset(synthetic_root / category, "test"):
            if not sample.label:
                continue
            image = np.asarray(load_image(sample.image_path)).astype(float)
            mask = load_mask(sample.mask_path)
            ring = ndimage.binary_dilation(mask, iterations=4) & ~mask
            contrast = np.abs(image[mask].mean(axis=0) - image[ring].mean(axis=0)).max()
            assert contrast > 35, (category, sample.defect_type, contrast)


def test_normal_images_vary_like_photographs(synthetic_root):
    for category in SYNTHETIC_CATEGORIES:
        train = [
            np.asarray(load_image(s.image_path)).astype(float)
            for s in FolderDataset(synthetic_root / category, "train")
        ]
        differences = [np.abs(a - b).mean() for a, b in itertools.pairwise(train)]
        assert min(differences) > 3, (category, differences)
        means = np.array([im.mean(axis=(0, 1)) for im in train])
        assert np.ptp(means, axis=0).max() < 40, category  # the same product, not different products


def test_same_seed_same_bytes_and_different_seed_different_images(tmp_path):
    args = dict(categories=["bottle_cap", "woven_fabric"], n_train=2, n_test=10, image_size=64)
    first = _files(make_synthetic_dataset(tmp_path / "a", seed=3, **args))
    second = _files(make_synthetic_dataset(tmp_path / "b", seed=3, **args))
    other = _files(make_synthetic_dataset(tmp_path / "c", seed=4, **args))
    assert first == second
    assert first.keys() == other.keys()
    images = [name for name in first if "ground_truth" not in name]
    assert all(first[name] != other[name] for name in images)
    assert len([n for n in first if "ground_truth" in n]) == 2 * 5


def test_a_subset_of_categories_gives_the_same_files_as_the_full_set(tmp_path, synthetic_root):
    subset = make_synthetic_dataset(
        tmp_path, categories=["metal_plate"], n_train=8, n_test=12, image_size=128
    )
    assert [p.name for p in subset.iterdir()] == ["metal_plate"]
    assert _files(subset / "metal_plate") == _files(synthetic_root / "metal_plate")


def test_generation_is_fast(tmp_path):
    start = time.perf_counter()
    make_synthetic_dataset(tmp_path, n_train=8, n_test=12, image_size=128, seed=1)
    assert time.perf_counter() - start < 6.0  # about 1 s on a 2-core machine; generous for loaded CI hosts


def test_other_sizes_and_counts(tmp_path):
    root = make_synthetic_dataset(tmp_path, categories=["grainy_leather"], n_train=1, n_test=3, image_size=40)
    test = FolderDataset(root / "grainy_leather", "test")
    assert [s.defect_type for s in test] == ["good", "scratch", "spot"]
    assert load_image(test[0].image_path).size == (40, 40)
    assert all(load_mask(s.mask_path).any() for s in test if s.label)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"categories": ["carpet"]},
        {"categories": []},
        {"categories": "bottle_cap"},
        {"n_train": 0},
        {"n_test": 1},
        {"image_size": 16},
        {"seed": -1},
        {"n_train": 2.5},
    ],
)
def test_bad_arguments_are_config_errors(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        make_synthetic_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())
