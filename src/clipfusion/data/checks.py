"""Finding and checking input files before any model work, so that every problem is reported at once, in
seconds, instead of one at a time after an hour of inference."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from PIL import Image

from clipfusion.data._common import IMAGE_SUFFIXES, Sample, is_image_file
from clipfusion.data.images import MIN_SIDE, load_image
from clipfusion.errors import InputError
from clipfusion.files import sha256_file
from clipfusion.progress import progress_bar

T = TypeVar("T")
log = logging.getLogger(__name__)


#: the file that marks a folder as the output of a clipfusion run (``clipfusion.outputs.folders.MANIFEST``)
RUN_MANIFEST = "manifest.json"


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a clipfusion run's outputs: a ``manifest.json`` as a prediction run writes
    it (a JSON object with ``format``, ``complete`` and ``files``). Its overlays and masks are pictures of
    the inputs, not product photos, so an input walk leaves the folder out."""
    manifest = folder / RUN_MANIFEST
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"format", "complete", "files"} <= set(data)


def _walk(root: Path, exclude: set[Path], left_out: list[Path]) -> list[Path]:
    """Image files under ``root`` in the order ``sorted(root.rglob("*"))`` gives (links to folders not
    followed), without entering a folder of ``exclude`` or one that holds a run."""
    found: list[Path] = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        kept = []
        for name in dirs:
            sub = here / name
            if sub.resolve() in exclude or holds_run(sub):
                left_out.append(sub)
            else:
                kept.append(name)
        dirs[:] = kept
        found.extend(p for p in (here / n for n in names) if is_image_file(p))
    return sorted(found)


def collect_images(
    inputs: Sequence[str | Path], *, exclude: Sequence[str | Path] = ()
) -> tuple[list[Path], list[str]]:
    """Files as given and the image files under folders (recursively, sorted); problems listed, not raised.

    A folder walk never enters a folder of ``exclude`` (the run's own output folder, which ``--overwrite``
    is about to replace) nor a folder that holds an earlier run (:func:`holds_run`): scoring a run's
    overlays as product photos is never what was meant. The folders left out are said in one line. A file
    named inside an excluded folder, or a folder given that holds a run, is a problem (its files are a
    run's outputs).
    """
    files: list[Path] = []
    problems: list[str] = []
    skip = {Path(p).resolve() for p in exclude}
    left_out: list[Path] = []
    for item in map(Path, inputs):
        inside = next((e for e in skip if e == item.resolve() or e in item.resolve().parents), None)
        if inside is not None and item.exists():
            problems.append(
                f"{item}: inside this run's output folder ({inside}), which the run writes; inputs cannot be "
                "outputs"
            )
        elif item.is_dir():
            if holds_run(item):
                problems.append(
                    f"{item}: holds the outputs of a clipfusion run ({RUN_MANIFEST}), not input images; "
                    "give the image files themselves to score them"
                )
                continue
            found = _walk(item, skip, left_out)
            if not found:
                problems.append(f"{item}: folder contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            problems.append(f"{item}: no such file or folder")
    if left_out:
        shown = ", ".join(map(str, left_out[:3])) + (" …" if len(left_out) > 3 else "")
        log.info(
            f"left out {len(left_out)} folder{'s' * (len(left_out) != 1)} of clipfusion outputs (this run's "
            f"--out, or an earlier run with its {RUN_MANIFEST}): {shown}"
        )
    return files, problems


def check_calibration_overlap(
    calibration: Sequence[Path],
    references: Sequence[Path] = (),
    reference_sha256: Sequence[str | None] = (),
) -> None:
    """Refuse calibration images that are references too — the same file, or the same bytes under another
    name (``reference_sha256``: a fitted detector's references, whose files may be elsewhere). The memory
    bank holds their patches, so their scores are the lowest any image can get: thresholds from them flag
    nearly every other normal image. One line names the overlap."""
    if not calibration or not (references or reference_sha256):
        return
    by_path = {p.resolve(): p for p in references}
    by_content: dict[str, str] = {sha: "a reference of the fit" for sha in reference_sha256 if sha}
    for ref in references:
        by_content.setdefault(sha256_file(ref), str(ref))
    overlap = []
    for image in calibration:
        twin = by_path.get(image.resolve()) or by_content.get(sha256_file(image))
        if twin is not None:
            overlap.append(f"{image}" + ("" if str(twin) == str(image) else f" = {twin}"))
    if overlap:
        shown = ", ".join(overlap[:3]) + (" …" if len(overlap) > 3 else "")
        raise InputError(
            f"--calibrate: {len(overlap)} of the {len(calibration)} calibration images are references too "
            f"({shown}); thresholds from images the memory bank holds flag nearly every other image: "
            "calibrate on other normal images"
        )


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
    # nothing to check (no references of a zero-shot run): no bar for work nobody asked for
    bar = progress_bar(len(items), desc, enabled=progress and len(items) > 0)
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
