"""MVTec AD (Bergmann et al., CVPR 2019): 15 categories in the layout read by :mod:`.folder`."""

from __future__ import annotations

from pathlib import Path

from clipfusion.data._common import SampleList, check_split
from clipfusion.data.folder import GOOD, scan_mvtec_layout
from clipfusion.errors import ConfigError, InputError, did_you_mean

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)


class MVTecAD(SampleList):
    """One category and split of MVTec AD; ``root`` is the folder that holds the 15 category folders.

    Every anomalous test image must have its ground-truth mask: the benchmark's pixel metrics are
    meaningless with some masks silently missing, so a missing one is an error naming the image. The
    grayscale categories (grid, screw, zipper) need no special care here; :func:`load_image` returns RGB.
    """

    def __init__(self, root: str | Path, category: str, split: str) -> None:
        root = Path(root)
        check_split(split)
        if category not in MVTEC_CATEGORIES:
            raise ConfigError(
                f"unknown MVTec AD category {category!r}; {did_you_mean(category, MVTEC_CATEGORIES)}known: "
                f"{', '.join(MVTEC_CATEGORIES)}"
            )
        if not root.is_dir():
            raise InputError(
                f"{root}: folder not found (expected the MVTec AD root holding the category folders)"
            )
        product = root / category
        good = product / "train" / GOOD
        if not good.is_dir():
            raise InputError(
                f"{good}: folder not found (expected the MVTec AD layout <root>/{category}/train/good; "
                f"is {root} the folder that holds the category folders?)"
            )
        super().__init__(
            root, category, split, scan_mvtec_layout(product, category, split, masks_required=True)
        )
