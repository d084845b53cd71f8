"""``clipfusion predict``: score a folder of photos; write scores, heat maps, masks and an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from clipfusion.cli.options import (
    EXIT_OK,
    EXIT_USAGE,
    add_model_options,
    build_config,
    check_thresholds_early,
    check_weights,
    err,
    read_fitted,
    say,
    show_progress,
    warn,
    weights_dir,
)
from clipfusion.errors import ConfigError
from clipfusion.outputs.report import REPORT_TOP

if TYPE_CHECKING:
    from clipfusion.fitted import FittedRecord
from clipfusion.provenance import random_weights_banner


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score your images; write scores, heat maps and an HTML report")
    p.add_argument(
        "images",
        nargs="*",
        type=Path,
        help="image files or folders (with --engine ray also .txt, .csv or .parquet lists of paths)",
    )
    p.add_argument(
        "--fitted",
        nargs="+",
        action="extend",
        metavar="DIR",
        help="a detector saved by `clipfusion fit` (instead of --object/--refs); several (DIR or NAME=DIR) "
        "score a mixed batch on one copy of the models, each input routed to its object by a .csv/.parquet "
        "list with path and object columns or by a folder of sub-folders named after the objects (the "
        "folders after --fitted are fitted folders up to the first that is not: the inputs)",
    )
    p.add_argument("--object", help='what the product is, e.g. "metal nut"')
    p.add_argument("--refs", nargs="+", type=Path, help="normal reference images or folders (few-shot)")
    p.add_argument("--out", type=Path, default=Path("clipfusion-out"), help="output folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --out (only the files its manifest.json lists are removed)",
    )
    p.add_argument("--threshold", type=float, help="image score above which an image is anomalous")
    p.add_argument("--pixel-threshold", type=float, help="map value above which a pixel is anomalous (masks)")
    p.add_argument(
        "--calibrate",
        type=Path,
        help="folder of held-out NORMAL images: sets the thresholds to the --quantile of their scores",
    )
    p.add_argument("--quantile", type=float, help="calibration quantile (default 0.99)")
    p.add_argument(
        "--thresholds",
        type=Path,
        metavar="FILE",
        help="thresholds.json of an earlier calibration (same configuration, object and references)",
    )
    p.add_argument("--normalize", default="set", help="heat-map scale: 'set' (shared) or 'image'")
    p.add_argument("--skip-bad", action="store_true", help="continue past unreadable images, listing them")
    p.add_argument(
        "--report-top",
        type=int,
        default=REPORT_TOP,
        metavar="N",
        help=f"cards in report.html: the N highest scores, beside a histogram of all (default {REPORT_TOP})",
    )
    add_model_options(p)
    ray = p.add_argument_group("many machines (--engine ray; see README 'Running on many machines')")
    ray.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local (default) or ray: Ray Data batch inference",
    )
    ray.add_argument(
        "--address", help="a running Ray cluster: auto or HOST:PORT (default: a private Ray instance)"
    )
    ray.add_argument(
        "--workers", type=int, help="model actors, each loading the fitted detector once (default 1)"
    )
    ray.add_argument(
        "--gpus-per-worker", type=float, metavar="G", help="GPUs per actor (then on CUDA; default 0)"
    )
    ray.add_argument(
        "--cpus-per-worker", type=float, metavar="C", help="CPUs (torch threads) per actor (default 1)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run in --out, skipping finished images"
    )
    p.set_defaults(func=run)


#: the options that only mean something with --engine ray
RAY_OPTIONS = ("address", "workers", "gpus_per_worker", "cpus_per_worker")


def split_fitted(args: argparse.Namespace) -> None:
    """``--fitted A B C INPUTS``: argparse gives every path after ``--fitted`` to it; the first is a fitted
    folder (read, so a wrong one says why), then each that is one too (``NAME=DIR``, or a folder with a
    ``detector.json``), and the first that is not starts the inputs."""
    from clipfusion.fitted import DETECTOR_FILE

    if not args.fitted:
        return
    given = [str(item) for item in args.fitted]
    keep = 1
    while keep < len(given):
        item = given[keep]
        name, sep, rest = item.partition("=")
        if not ((sep and rest and "/" not in name) or (Path(item) / DETECTOR_FILE).is_file()):
            break
        keep += 1
    args.fitted = given[:keep]
    args.images = [*args.images, *(Path(item) for item in given[keep:])]


def run(args: argparse.Namespace) -> int:
    from clipfusion.calibration import calibrate
    from clipfusion.data.checks import check_calibration_overlap, check_images, collect_images
    from clipfusion.detector import CLIPFusion
    from clipfusion.outputs import report
    from clipfusion.outputs.folders import (
        OutputFolder,
        check_input_file,
        check_input_folder,
        interrupted_note,
    )
    from clipfusion.outputs.predictions import write_predictions
    from clipfusion.thresholds import DEFAULT_QUANTILE, Thresholds

    split_fitted(args)
    if not args.images:
        raise ConfigError("give the images to score (files, folders or lists)")
    args.on_interrupt = lambda: interrupted_note(args.out)  # what Ctrl-C says: done so far, how to go on
    if args.engine == "ray":
        from clipfusion.cli.predict_ray import run as run_on_ray

        return run_on_ray(args)
    given = [f"--{o.replace('_', '-')}" for o in RAY_OPTIONS if getattr(args, o) not in (None, False)]
    if given:
        raise ConfigError(f"{', '.join(given)}: only with --engine ray")
    if args.report_top < 1:
        raise ConfigError(f"--report-top must be at least 1, got {args.report_top}")

    # every option and path is checked before any model work, each problem in one line
    if not args.fitted and not args.object:
        raise ConfigError("give --object NAME (and --refs for few-shot), or --fitted DIR")
    if args.quantile is not None and not 0.0 < args.quantile <= 1.0:
        raise ConfigError(f"--quantile must lie in (0, 1], got {args.quantile}")
    if args.normalize not in report.NORMALISATIONS:
        raise ConfigError(f"--normalize must be one of {', '.join(report.NORMALISATIONS)}")
    if args.calibrate is not None and args.thresholds is not None:
        raise ConfigError("give either --calibrate or --thresholds, not both")
    records = read_fitted(args) if args.fitted else {}
    if len(records) > 1:
        return _run_many(args, records)
    fitted = next(iter(records.values()), None)
    config = fitted.config if fitted else build_config(args)
    out = OutputFolder(args.out, overwrite=args.overwrite, resume=args.resume)
    out.check()
    if args.calibrate is not None:
        check_input_folder(args.calibrate, "--calibrate")
    saved = Thresholds.load(check_input_file(args.thresholds, "--thresholds")) if args.thresholds else None
    if saved is not None:
        saved.check_config(config.to_dict(), str(args.thresholds))
    check_weights(config, args)
    progress = show_progress(args)
    mine = [args.out]  # a walk never takes this run's own outputs (nor an earlier run's) for inputs
    files, problems = collect_images(args.images, exclude=mine)
    refs, ref_problems = collect_images(args.refs, exclude=mine) if args.refs else ([], [])
    calib, calib_problems = collect_images([args.calibrate], exclude=mine) if args.calibrate else ([], [])
    problems += ref_problems + calib_problems
    given_files = files
    files, bad = check_images(files, progress, desc="checking images")
    refs, bad_refs = check_images(refs, progress, desc="checking references")
    calib, bad_calib = check_images(calib, progress, desc="checking calibration images")
    skipped = bad + bad_refs + bad_calib
    if problems or (skipped and not args.skip_bad):
        for line in problems + skipped:
            err(line)
        if skipped and not problems:
            err("use --skip-bad to continue without the unreadable images")
        return EXIT_USAGE
    if not files:
        err("no readable input image")
        return EXIT_USAGE
    for line in skipped:
        warn(f"skipped: {line}")
    check_calibration_overlap(calib, refs, [r.get("sha256") for r in fitted.references] if fitted else ())
    if saved is not None:
        where = str(args.thresholds)
        check_thresholds_early(saved, where, config, fitted=fitted, object_name=args.object, references=refs)

    banner = random_weights_banner(config)
    if banner:
        warn(banner)
    if fitted:
        say(f"loading the fitted detector {fitted.path} ({config.preset} preset, device {config.device})")
        detector = CLIPFusion.load(fitted.path, weights_dir(args), device=args.device)
        refs = detector.references
        object_name = detector.object_name
    else:
        say(f"loading the models ({config.preset} preset, device {config.device}, {config.dtype})")
        # prompts encoded and text encoders freed before the image models load (the lowest peak memory)
        detector = CLIPFusion(config, weights_dir=weights_dir(args), objects=[args.object])
        shots = f"{len(refs)} references: memory banks" if refs else "zero-shot"
        say(f"fitting to {args.object!r} ({shots})")
        detector.fit(args.object, refs)
        object_name = args.object

    thresholds = detector.thresholds  # a fitted detector's own, when it was calibrated
    if calib:
        q = args.quantile if args.quantile is not None else DEFAULT_QUANTILE
        say(f"calibrating on {len(calib)} normal images")
        thresholds = calibrate(detector, calib, q, batch_size=args.batch_size, progress=progress)
        say(
            f"calibrated on {len(calib)} normal images (quantile {q}): threshold {thresholds.image:.6f}, "
            f"pixel threshold {thresholds.pixel:.6f}"
        )
    elif saved is not None:
        thresholds = saved
        say(f"thresholds from {args.thresholds}: {saved.image:.6f}, pixel {saved.pixel:.6f}")
    threshold, pixel_threshold = args.threshold, args.pixel_threshold
    if thresholds is not None:
        # explicit values win; thresholds.json then says which were set by hand, from which calibration
        threshold = thresholds.image if threshold is None else threshold
        pixel_threshold = thresholds.pixel if pixel_threshold is None else pixel_threshold
        thresholds = thresholds.with_values(threshold, pixel_threshold)

    details = {
        "object": object_name,
        "references": f"{len(refs)} ({'zero-shot' if not refs else 'few-shot'})",
        "preset": config.preset,
    }
    if fitted:
        details["fitted detector"] = str(fitted.path)
    if skipped:
        details["skipped (unreadable)"] = "; ".join(skipped)
    write_predictions(
        detector,
        files,
        out,
        threshold=threshold,
        pixel_threshold=pixel_threshold,
        thresholds=thresholds,
        normalize=args.normalize,
        batch_size=args.batch_size,
        progress=progress,
        title=f"clipfusion: {object_name}",
        banner=banner,
        details=details,
        report_top=args.report_top,
        skipped=_unreadable(given_files, files, bad),
    )
    say(f"wrote {len(files)} images' scores, maps and overlays and the report to {out.path}")
    return EXIT_OK


def _unreadable(given: list[Path], good: list[Path], problems: list[str]) -> list[tuple[str, str]]:
    """(path, problem) for each input left out, in input order (``check_images`` keeps that order)."""
    kept = iter(good)
    nxt = next(kept, None)
    bad = []
    for path in given:
        if nxt is not None and path == nxt:
            nxt = next(kept, None)
        else:
            bad.append(str(path))
    return list(zip(bad, problems, strict=True))


def _run_many(args: argparse.Namespace, records: dict[str, FittedRecord]) -> int:
    """``--fitted A B C``: the inputs routed to their objects, every object on one copy of the models, one
    sub-folder of outputs per object (as its own ``predict --fitted`` writes it) and the run's files across
    them (:func:`clipfusion.outputs.predictions.write_line_predictions`)."""
    from clipfusion.data.checks import check_images
    from clipfusion.data.routing import route_inputs
    from clipfusion.detector_set import DetectorSet
    from clipfusion.outputs.folders import OutputFolder
    from clipfusion.outputs.predictions import write_line_predictions

    if args.resume:
        raise ConfigError(
            "--resume continues a run of one fitted object (with --engine ray, of several); run the objects "
            "again into a new --out, or one by one"
        )
    per_fit = [
        o
        for o in ("calibrate", "thresholds", "threshold", "pixel_threshold", "quantile")
        if getattr(args, o) is not None
    ]
    if per_fit:
        options = ", ".join(f"--{o.replace('_', '-')}" for o in per_fit)
        raise ConfigError(
            f"{options}: with several fitted objects each keeps the thresholds of its own fit "
            "(`clipfusion fit --calibrate`); drop them, or score the objects one by one"
        )
    out = OutputFolder(args.out, overwrite=args.overwrite)
    out.check()
    names = list(records)
    for record in records.values():
        check_weights(record.config, args)
    routed, problems = route_inputs(args.images, names, exclude=[args.out])
    progress = show_progress(args)
    good, bad = check_images([path for path, _ in routed], progress, desc="checking images")
    if problems or (bad and not args.skip_bad):
        for line in problems + bad:
            err(line)
        if bad and not problems:
            err("use --skip-bad to continue without the unreadable images")
        return EXIT_USAGE
    kept = set(good)
    left_out = [(path, name) for path, name in routed if path not in kept]
    # check_images lists the problems in input order, as left_out is
    skipped = [(str(path), name, problem) for (path, name), problem in zip(left_out, bad, strict=True)]
    routed = [(path, name) for path, name in routed if path in kept]
    if not routed:
        err("no readable input image")
        return EXIT_USAGE
    for line in bad:
        warn(f"skipped: {line}")
    banners = {name: random_weights_banner(record.config) for name, record in records.items()}
    for line in dict.fromkeys(b for b in banners.values() if b):
        warn(line)
    used = [name for name in names if any(of == name for _, of in routed)]
    say(f"loading {len(used)} fitted objects ({', '.join(used)}) on shared models")
    folders = {name: records[name].path for name in used}
    detectors = DetectorSet.load(folders, weights_dir=weights_dir(args), device=args.device, log=say)
    details = {}
    for name in used:
        detector = detectors[name]
        shots = len(detector.references)
        details[name] = {
            "object": str(detector.object_name),
            "references": f"{shots} ({'zero-shot' if not shots else 'few-shot'})",
            "preset": detector.config.preset,
            "fitted detector": str(records[name].path),
        }
        unreadable = [problem for _, of, problem in skipped if of == name]
        if unreadable:
            details[name]["skipped (unreadable)"] = "; ".join(unreadable)
    rows = write_line_predictions(
        detectors,
        routed,
        out,
        details=details,
        banners=banners,
        normalize=args.normalize,
        batch_size=args.batch_size,
        progress=progress,
        report_top=args.report_top,
        skipped=skipped,
    )
    say(f"wrote {len(rows)} images' scores of {len(used)} objects, one folder each, to {out.path}")
    return EXIT_OK
