"""VisA (Zou et al., ECCV 2022) in its official layout, described by ``<root>/split_csv/1cls.csv``.

The CSV has the columns ``object,split,label,image,mask``; ``label`` is ``normal`` or ``anomaly`` and the
paths are relative to ``root``. VisA has no defect-type folders, so anomalous items get the defect type
``"anomaly"``.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath, PureWindowsPath

from clipfusion.data._common import IMAGE_SUFFIXES, Sample, SampleList, check_split
from clipfusion.errors import ConfigError, InputError, did_you_mean

VISA_CATEGORIES: tuple[str, ...] = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)

SPLIT_CSV = Path("split_csv") / "1cls.csv"
CSV_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}


def _inside_root(root: Path, raw: str, where: str) -> Path:
    """Resolve a CSV path against ``root``, refusing anything that could point outside it.

    A data set description is input like any other: an absolute path or ``..`` in it would let a crafted
    CSV make the tool read (and later report on) arbitrary files.
    """
    text = raw.strip()
    posix, windows = PurePosixPath(text), PureWindowsPath(text)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        raise InputError(f"{where}: path {raw!r} is absolute (expected a path relative to the data set root)")
    parts = windows.parts  # splits on both / and \
    if ".." in parts:
        raise InputError(f"{where}: path {raw!r} leaves the data set root ('..' is not allowed)")
    return root.joinpath(*parts)


class VisA(SampleList):
    """One category and split of VisA as listed by the official ``split_csv/1cls.csv``.

    ``root`` is the folder holding ``split_csv/`` and the category folders (the official preparation
    script's output). Listed files are checked to exist so that a half-copied data set fails at once, with
    the CSV line at fault.
    """

    def __init__(self, root: str | Path, category: str, split: str) -> None:
        root = Path(root)
        check_split(split)
        if category not in VISA_CATEGORIES:
            raise ConfigError(
                f"unknown VisA category {category!r}; {did_you_mean(category, VISA_CATEGORIES)}known: "
                f"{', '.join(VISA_CATEGORIES)}"
            )
        csv_path = root / SPLIT_CSV
        if not csv_path.is_file():
            raise InputError(
                f"{csv_path}: file not found (expected the official VisA layout with split_csv/1cls.csv "
                f"under {root})"
            )
        super().__init__(root, category, split, self._read(root, csv_path, category, split))

    @staticmethod
    def _read(root: Path, csv_path: Path, category: str, split: str) -> list[Sample]:
        items: list[Sample] = []
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                header = [name.strip() for name in reader.fieldnames or []]
                missing = [c for c in CSV_COLUMNS if c not in header]
                if missing:
                    raise InputError(
                        f"{csv_path}: missing column(s) {', '.join(missing)} (expected a header with "
                        f"{','.join(CSV_COLUMNS)}; found {','.join(header) or 'nothing'})"
                    )
                reader.fieldnames = header
                for row in reader:
                    where = f"{csv_path}:{reader.line_num}"
                    if any(row.get(c) is None for c in CSV_COLUMNS):
                        raise InputError(f"{where}: too few fields (expected {','.join(CSV_COLUMNS)})")
                    if row["object"].strip() != category or row["split"].strip() != split:
                        continue
                    items.append(VisA._sample(root, row, category, where))
        except UnicodeDecodeError as exc:
            raise InputError(f"{csv_path}: not a UTF-8 text file ({exc.reason})") from exc
        except csv.Error as exc:
            raise InputError(f"{csv_path}: malformed CSV ({exc})") from exc
        if not items:
            raise InputError(f"{csv_path}: no rows for object {category!r} and split {split!r}")
        return items

    @staticmethod
    def _sample(root: Path, row: dict[str, str], category: str, where: str) -> Sample:
        label_text = row["label"].strip().lower()
        if label_text not in _LABELS:
            raise InputError(f"{where}: label {row['label']!r} is neither 'normal' nor 'anomaly'")
        label = _LABELS[label_text]
        if not row["image"].strip():
            raise InputError(f"{where}: empty image path")
        image = _inside_root(root, row["image"], where)
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"{where}: {row['image']!r} does not have an image suffix")
        if not image.is_file():
            raise InputError(f"{where}: listed image {image} not found")
        mask: Path | None = None
        if label == 1:
            if not row["mask"].strip():
                raise InputError(f"{where}: anomalous image {image} has no mask path")
            mask = _inside_root(root, row["mask"], where)
            if not mask.is_file():
                raise InputError(f"{where}: listed mask {mask} not found (for image {image})")
        return Sample(image, label, mask, "anomaly" if label else "good", category)
