"""The MVTec AD folder layout, for the benchmark itself and for a user's own product.

    <product>/train/good/*.png
    <product>/test/good/*.png
    <product>/test/<defect>/*.png
    <product>/ground_truth/<defect>/<stem>_mask.png

The scan is shared: :class:`MVTecAD` insists on a mask for every anomalous test image (pixel metrics need
them), :class:`FolderDataset` takes masks where they exist.
"""

from __future__ import annotations

from pathlib import Path

from clipfusion.data._common import Sample, SampleList, check_split, list_images, list_subfolders
from clipfusion.errors import InputError

GOOD = "good"
MASK_SUFFIX = "_mask"
# a mask is normally a PNG; other image suffixes are accepted for users' own data, PNG first
_MASK_EXTENSIONS = (".png", ".PNG", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".webp")


def find_mask(ground_truth: Path, defect: str, image: Path) -> Path | None:
    folder = ground_truth / defect
    for ext in _MASK_EXTENSIONS:
        candidate = folder / f"{image.stem}{MASK_SUFFIX}{ext}"
        if candidate.is_file():
            return candidate
    return None


def scan_mvtec_layout(product_dir: Path, category: str, split: str, *, masks_required: bool) -> list[Sample]:
    """Samples of one split of one product folder in the MVTec AD layout."""
    if not product_dir.is_dir():
        raise InputError(
            f"{product_dir}: folder not found (expected the MVTec AD layout with train/good and test/)"
        )
    if split == "train":
        good = product_dir / "train" / GOOD
        if not good.is_dir():
            raise InputError(f"{good}: folder not found (expected the normal training images in train/good)")
        items = [Sample(p, 0, None, GOOD, category) for p in list_images(good)]
        if not items:
            raise InputError(
                f"{good}: no images (expected .png/.jpg/.bmp/.tif/.webp files of normal samples)"
            )
        return items

    test_dir = product_dir / "test"
    if not test_dir.is_dir():
        raise InputError(f"{test_dir}: folder not found (expected test/good and test/<defect> folders)")
    ground_truth = product_dir / "ground_truth"
    items: list[Sample] = []
    for defect_dir in list_subfolders(test_dir):
        defect = defect_dir.name
        for image in list_images(defect_dir):
            if defect == GOOD:
                items.append(Sample(image, 0, None, GOOD, category))
                continue
            mask = find_mask(ground_truth, defect, image)
            if mask is None and masks_required:
                raise InputError(
                    f"{image}: anomalous test image without a ground-truth mask "
                    f"(expected {ground_truth / defect / (image.stem + MASK_SUFFIX + '.png')})"
                )
            items.append(Sample(image, 1, mask, defect, category))
    if not items:
        raise InputError(f"{test_dir}: no images (expected test/good and test/<defect> folders of images)")
    return items


class FolderDataset(SampleList):
    """A user's own data for one product, in the MVTec AD layout; ground-truth masks are optional.

    ``root`` is the product folder itself (the one holding ``train/`` and ``test/``); its name is the
    category. Only the folders the split needs must exist: ``train/good`` for ``"train"``, ``test/`` for
    ``"test"`` (``test/good`` may be absent when only defects are to be scored). Anomalous images without a
    mask get ``mask_path=None`` and count for image-level metrics only.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        root = Path(root)
        check_split(split)
        category = root.resolve().name if root.name in ("", ".", "..") else root.name
        super().__init__(
            root, category, split, scan_mvtec_layout(root, category, split, masks_required=False)
        )
