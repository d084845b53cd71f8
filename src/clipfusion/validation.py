"""Checking a data set's files before any model work, so that every problem is reported at once, in
seconds, instead of one at a time after an hour of inference."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from clipfusion.data import Sample, load_image
from clipfusion.data.images import MIN_SIDE
from clipfusion.errors import InputError


def _header_size(path) -> tuple[int, int]:
    """The size a person sees: the stored size, swapped when the EXIF orientation turns the image."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def check_sample(sample: Sample) -> str | None:
    """The problem with one sample (unreadable image, too small, bad or mismatched mask), or None."""
    try:
        load_image(sample.image_path, min_side=MIN_SIDE)
        if sample.mask_path is not None:
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
    except InputError as exc:
        return str(exc)
    return None


def check_samples(
    samples: Sequence[Sample], progress: bool = False, desc: str = "checking"
) -> tuple[list[Sample], list[str]]:
    """Decode every image (and mask header) in parallel; returns the good samples and the problems."""
    from tqdm.auto import tqdm

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding
        results = list(
            tqdm(
                pool.map(check_sample, samples),
                total=len(samples),
                desc=desc,
                disable=not progress,
                leave=False,
            )
        )
    good = [s for s, problem in zip(samples, results, strict=True) if problem is None]
    return good, [p for p in results if p is not None]
