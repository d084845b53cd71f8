"""The data set kinds the benchmark protocol reads, by name: ``mvtec``, ``visa`` and ``folder``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from clipfusion.data._common import SampleList
from clipfusion.errors import ConfigError, InputError, InputErrors, did_you_mean

DATASET_KINDS = ("mvtec", "visa", "folder")


def check_kind(kind: str) -> str:
    if kind not in DATASET_KINDS:
        raise ConfigError(
            f"unknown dataset {kind!r}; {did_you_mean(kind, DATASET_KINDS)}choose one of "
            f"{', '.join(DATASET_KINDS)}"
        )
    return kind


def _found_here(root: Path) -> str:
    entries = sorted(
        p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not p.name.startswith(".")
    )
    if not entries:
        return "the folder is empty"
    return "found: " + ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")


def check_root(kind: str, root: Path, categories: Sequence[str] | None = None) -> None:
    """One line when ``root`` is not the claimed layout at all: what was expected there, and what is there
    (instead of the same problem once per category)."""
    from clipfusion.data.mvtec import MVTEC_CATEGORIES
    from clipfusion.data.visa import SPLIT_CSV

    if kind == "mvtec":
        wanted = [c for c in categories or () if c in MVTEC_CATEGORIES] or list(MVTEC_CATEGORIES)
        if not any((root / c / "train" / "good").is_dir() for c in wanted):
            raise InputError(
                f"{root}: not an MVTec AD root: expected the category folders (bottle/, cable/, … each with "
                f"train/good and test/) directly inside it; {_found_here(root)}"
            )
    elif kind == "visa" and not (root / SPLIT_CSV).is_file():
        raise InputError(
            f"{root}: not a VisA root: expected {SPLIT_CSV} (the official preparation script's layout) "
            f"inside it; {_found_here(root)}"
        )


def dataset_categories(kind: str, root: str | Path, categories: Sequence[str] | None = None) -> list[str]:
    """The categories to evaluate: those asked for, else every category of the data set found under root.

    For ``folder``, ``root`` is either one product folder (``train/good`` directly under it) or a folder of
    product folders; the category of a single product is the folder's name.
    """
    from clipfusion.data.mvtec import MVTEC_CATEGORIES
    from clipfusion.data.visa import VISA_CATEGORIES

    check_kind(kind)
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: data set root does not exist or is not a folder")
    check_root(kind, root, categories)
    if categories and kind == "folder":
        _check_products(root, categories)
    if categories:
        return list(categories)
    if kind == "mvtec":
        return [c for c in MVTEC_CATEGORIES if (root / c).is_dir()]
    if kind == "visa":
        return list(VISA_CATEGORIES)
    if (root / "train" / "good").is_dir():
        return [root.name]
    found = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not found:
        raise InputError(f"{root}: no product folder with train/good found (expected the MVTec layout)")
    return found


def _check_products(root: Path, categories: Sequence[str]) -> None:
    """``--category`` of a folder data set: each must be a product folder under ``root`` (or ``root``
    itself); one line per unknown one, with the closest names and every product found."""
    if (root / "train").is_dir() and list(categories) == [root.name]:
        return
    found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir() or (p / "test").is_dir())
    problems = [
        f"{root}: no product folder {c!r} (with train/ or test/); {did_you_mean(c, found)}products found: "
        f"{', '.join(found) or 'none'}"
        for c in categories
        if c not in found
    ]
    if problems:
        raise InputErrors(problems)


def open_split(kind: str, root: str | Path, category: str, split: str) -> SampleList:
    """One split (``train`` or ``test``) of one category of a data set of the given kind."""
    from clipfusion.data.folder import FolderDataset
    from clipfusion.data.mvtec import MVTecAD
    from clipfusion.data.visa import VisA

    check_kind(kind)
    root = Path(root)
    if kind == "mvtec":
        return MVTecAD(root, category, split)
    if kind == "visa":
        return VisA(root, category, split)
    product = root if root.name == category and (root / "train").is_dir() else root / category
    return FolderDataset(product, split)
