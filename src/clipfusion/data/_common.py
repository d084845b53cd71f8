"""Pieces shared by the data set readers: the item type, split checks and image-file discovery."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from clipfusion.errors import ConfigError

SPLITS = ("train", "test")

# Lower-case suffixes that count as images when a folder is scanned. Anything else (README files, masks in
# other folders, thumbnails caches) is ignored so that stray files cannot become samples.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class Sample:
    """One image of a data set.

    Frozen so that items can be hashed, shared between the evaluation and the reports, and recorded as the
    few-shot references of a run without fear of later mutation.
    """

    image_path: Path
    label: int
    mask_path: Path | None
    defect_type: str
    category: str

    @property
    def is_anomalous(self) -> bool:
        return self.label == 1


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    return split


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted by name for a stable order."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def list_subfolders(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
    )


class SampleList(Sequence[Sample]):
    """A read-only, ordered list of samples with the attributes every data set carries."""

    def __init__(self, root: Path, category: str, split: str, items: Iterable[Sample]) -> None:
        self.root = root
        self.category = category
        self.split = split
        self._items: tuple[Sample, ...] = tuple(sorted(items, key=lambda s: str(s.image_path)))

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | Sequence[Sample]:
        return self._items[index]

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self._items]

    def __repr__(self) -> str:
        n_anomalous = sum(self.labels)
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, category={self.category!r}, "
            f"split={self.split!r}, {len(self)} images, {n_anomalous} anomalous)"
        )
