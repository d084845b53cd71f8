"""``clipfusion fit`` for several objects in one command, on one load of the models.

Either a folder of reference folders (``--refs-root DIR``: ``DIR/<object>/`` holds each object's normal
images, the object's name is the folder's) or every category of a benchmark root (``--dataset mvtec --root
R --shots K --seed S``: the references drawn as ``clipfusion evaluate`` draws them). Each object gets its
fitted folder, ``OUT/<object>/``, as ``clipfusion fit`` would write it alone (the same files, bit for bit:
the shared models compute what the object's own would); ``--calibrate DIR`` then names one folder of
held-out normal images per object, ``DIR/<object>/``.

Every object's prompts are encoded while the text encoders load alone, before the image models, as for one
object: fifteen objects cost one load of the models, not fifteen.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from clipfusion.cli.options import (
    EXIT_OK,
    EXIT_USAGE,
    build_config,
    check_weights,
    err,
    say,
    show_progress,
    warn,
    weights_dir,
)
from clipfusion.data.datasets import DATASET_KINDS
from clipfusion.errors import ConfigError, InputError, InputErrors
from clipfusion.provenance import random_weights_banner


def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "several objects in one command (one load of the models; one fitted folder each in --out)"
    )
    group.add_argument(
        "--refs-root",
        type=Path,
        metavar="DIR",
        help="a folder of reference folders: DIR/<object>/ holds each object's normal images",
    )
    group.add_argument(
        "--dataset", choices=DATASET_KINDS, help="fit every category of a benchmark root (with --root)"
    )
    group.add_argument("--root", type=Path, help="the --dataset root")
    group.add_argument("--category", nargs="+", help="--dataset categories (default: all)")
    group.add_argument(
        "--shots", type=int, help="--dataset references per category, drawn as evaluate draws them"
    )
    group.add_argument("--seed", type=int, default=0, help="--dataset reference-sampling seed (default 0)")


def asked(args: argparse.Namespace) -> bool:
    return args.refs_root is not None or args.dataset is not None


@dataclass
class Job:
    """One object to fit: its folder name in --out, the name its prompts use, its images."""

    folder: str
    object_name: str
    refs: list[Path]
    calibration: list[Path] = field(default_factory=list)


def _jobs(args: argparse.Namespace, config: object) -> list[Job]:
    from clipfusion.data import object_name
    from clipfusion.data.checks import collect_images
    from clipfusion.data.datasets import dataset_categories, open_split
    from clipfusion.data.sampling import sample_references
    from clipfusion.fitted import NAME_PATTERN

    names = getattr(config, "object_names", {})
    jobs: list[Job] = []
    problems: list[str] = []
    if args.refs_root is not None:
        root: Path = args.refs_root
        if not root.is_dir():
            raise InputError(f"{root}: --refs-root must be a folder of reference folders, one per object")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise InputError(f"{root}: --refs-root holds no folder (one per object: {root}/<object>/)")
        for folder in folders:
            files, found = collect_images([folder], exclude=[args.out])
            problems += found
            jobs.append(Job(folder.name, object_name(folder.name, names), files))
    else:
        if args.root is None or args.shots is None:
            raise ConfigError("--dataset needs --root and --shots (0 for zero-shot)")
        if args.shots < 0:
            raise ConfigError(f"--shots must be >= 0, got {args.shots}")
        for category in dataset_categories(args.dataset, args.root, args.category):
            try:
                train = list(open_split(args.dataset, args.root, category, "train"))
                chosen = sample_references(train, args.shots, args.seed)
            except InputError as exc:
                problems.append(str(exc))
                continue
            jobs.append(Job(category, object_name(category, names), [s.image_path for s in chosen]))
    for job in jobs:
        if not NAME_PATTERN.match(job.folder):
            problems.append(f"{job.folder!r}: not a usable name for a fitted folder (letters, digits, . _ -)")
    if args.calibrate is not None:
        for job in jobs:
            folder = args.calibrate / job.folder
            if not folder.is_dir():
                problems.append(f"{folder}: --calibrate has no folder for {job.folder!r} (one per object)")
                continue
            job.calibration, found = collect_images([folder], exclude=[args.out])
            problems += found
    if problems:
        raise InputErrors(problems)
    return jobs


def run(args: argparse.Namespace) -> int:
    """Fit every object of --refs-root or --dataset on one load of the models; one fitted folder each."""
    from clipfusion.calibration import calibrate
    from clipfusion.data.checks import check_calibration_overlap, check_images
    from clipfusion.detector import CLIPFusion
    from clipfusion.fitted import DETECTOR_FILE, describe_existing
    from clipfusion.outputs.folders import check_creatable, check_input_folder
    from clipfusion.shared import SharedModels
    from clipfusion.thresholds import DEFAULT_QUANTILE

    if args.refs_root is not None and args.dataset is not None:
        raise ConfigError("give either --refs-root or --dataset, not both")
    given = [o for o, v in (("--object", args.object), ("--refs", args.refs)) if v]
    if given:
        raise ConfigError(f"{', '.join(given)}: one object; --refs-root and --dataset name several")
    if args.quantile is not None and not 0.0 < args.quantile <= 1.0:
        raise ConfigError(f"--quantile must lie in (0, 1], got {args.quantile}")
    if args.quantile is not None and not args.calibrate:
        raise ConfigError("--quantile needs --calibrate")
    if args.calibrate is not None:
        check_input_folder(args.calibrate, "--calibrate")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out names an existing file; give a folder")
    check_creatable(out, "--out")
    config = build_config(args)
    check_weights(config, args)
    jobs = _jobs(args, config)
    refused = []
    for job in jobs:
        target = out / job.folder
        if target.is_dir() and any(target.iterdir()) and not (target / DETECTOR_FILE).is_file():
            refused.append(f"{target}: not empty and holds no fitted detector; choose a new --out")
        elif (existing := describe_existing(target)) and not args.overwrite:
            refused.append(f"{target}: holds a fitted detector ({existing}); add --overwrite to replace it")
    if refused:
        raise InputErrors(refused)
    args.on_interrupt = lambda: f"the objects fitted so far are saved in {out}; the others are not"
    progress = show_progress(args)
    skipped: list[str] = []
    for job in jobs:
        job.refs, bad = check_images(job.refs, progress, desc=f"checking {job.folder} references")
        skipped += bad
        if job.calibration:
            job.calibration, bad = check_images(job.calibration, progress, desc=f"checking {job.folder}")
            skipped += bad
    if skipped and not args.skip_bad:
        for line in skipped:
            err(line)
        err("use --skip-bad to continue without the unreadable images")
        return EXIT_USAGE
    for line in skipped:
        warn(f"skipped: {line}")
    for job in jobs:
        check_calibration_overlap(job.calibration, job.refs)

    banner = random_weights_banner(config)
    if banner:
        warn(banner)
    start = time.perf_counter()
    say(f"loading the models once for {len(jobs)} objects ({config.preset} configuration)")
    models = SharedModels(config, weights_dir=weights_dir(args), objects=[job.object_name for job in jobs])
    say(f"loaded in {time.perf_counter() - start:.1f} s")
    q = args.quantile if args.quantile is not None else DEFAULT_QUANTILE
    for index, job in enumerate(jobs, start=1):
        regime = f"{len(job.refs)}-shot" if job.refs else "zero-shot"
        say(f"[{index}/{len(jobs)}] {job.folder}: fitting {job.object_name!r} ({regime})")
        detector = CLIPFusion(config, models=models).fit(job.object_name, job.refs)
        thresholds = None
        if job.calibration:
            thresholds = calibrate(
                detector, job.calibration, q, batch_size=args.batch_size, progress=progress
            )
            say(f"      threshold {thresholds.image:.6f}, pixel threshold {thresholds.pixel:.6f}")
        detector.save(out / job.folder, thresholds)
    say(f"fitted {len(jobs)} objects in {time.perf_counter() - start:.1f} s: {out}/<object>/")
    return EXIT_OK


__all__ = ["add_options", "asked", "run"]
