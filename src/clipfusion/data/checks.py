"""Finding and checking input files before any model work, so that every problem is reported at once, in
seconds, instead of one at a time after an hour of inference."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from PIL import Image

from clipfusion.data._common import IMAGE_SUFFIXES, Sample, is_image_file
from clipfusion.data.images import MIN_SIDE, load_image
from clipfusion.errors import InputError
from clipfusion.progress import progress_bar

T = TypeVar("T")


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Files as given and the image files under folders (recursively, sorted); problems listed, not raised."""
    files: list[Path] = []
    problems: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if is_image_file(p))
            if not found:
                problems.append(f"{item}: folder contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            problems.append(f"{item}: no such file or folder")
    return files, problems


def check_image(path: str | Path) -> str | None:
    """The problem with one image file (unreadable, corrupt, too small, too large), or None."""
    try:
        load_image(path, min_side=MIN_SIDE)
    except InputError as exc:
        return str(exc)
    return None


def _header_size(path: Path) -> tuple[int, int]:
    """The size a person sees: the stored size, swapped when the EXIF orientation turns the image."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def check_sample(sample: Sample) -> str | None:
    """The problem with one data set sample (its image, or a bad or mismatched mask), or None."""
    problem = check_image(sample.image_path)
    if problem is not None or sample.mask_path is None:
        return problem
    try:
        with Image.open(sample.mask_path) as mask:
            mask.load()
            mask_size = mask.size
    except Exception as exc:  # Pillow raises many types on bad files
        return f"{sample.mask_path}: unreadable mask ({type(exc).__name__}: {exc})"
    image_size = _header_size(sample.image_path)
    if mask_size != image_size:
        return (
            f"{sample.mask_path}: mask is {mask_size[0]}×{mask_size[1]} but its image "
            f"{sample.image_path.name} is {image_size[0]}×{image_size[1]}"
        )
    return None


def _check_all(
    items: Sequence[T], check: Callable[[T], str | None], progress: bool, desc: str
) -> tuple[list[T], list[str]]:
    """Run ``check`` over ``items`` in parallel (Pillow releases the GIL while decoding); the good items, in
    order, and the problems."""
    workers = max(1, min(8, os.cpu_count() or 1))
    bar = progress_bar(len(items), desc, enabled=progress)
    results: list[str | None] = []
    with ThreadPoolExecutor(workers) as pool:
        for problem in pool.map(check, items):
            results.append(problem)
            bar.update(1)
    bar.close()
    good = [item for item, problem in zip(items, results, strict=True) if problem is None]
    return good, [p for p in results if p is not None]


def check_images(
    paths: Sequence[Path], progress: bool = False, desc: str = "checking images"
) -> tuple[list[Path], list[str]]:
    """Decode every image once; returns the good paths and one line per problem."""
    return _check_all(paths, check_image, progress, desc)


def check_samples(
    samples: Sequence[Sample], progress: bool = False, desc: str = "checking"
) -> tuple[list[Sample], list[str]]:
    """Decode every image (and mask header) of a data set split; returns the good samples and the problems."""
    return _check_all(samples, check_sample, progress, desc)
