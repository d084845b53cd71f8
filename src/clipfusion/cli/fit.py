"""``clipfusion fit``: fit a detector for one product once and save it, for ``predict --fitted`` (and any
number of machines or servers) to use without the references."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clipfusion.cli import fit_many
from clipfusion.cli.options import (
    EXIT_OK,
    EXIT_USAGE,
    add_model_options,
    build_config,
    check_weights,
    err,
    say,
    show_progress,
    warn,
    weights_dir,
)
from clipfusion.errors import ConfigError, InputError
from clipfusion.provenance import random_weights_banner


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        help="fit a detector for one product (object name, references) and save it to a folder; or several "
        "products on one load of the models (--refs-root, --dataset)",
    )
    p.add_argument("--object", help='what the product is, e.g. "metal nut"')
    p.add_argument("--refs", nargs="+", type=Path, help="normal reference images or folders (few-shot)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the fitted detector's folder: new or empty (an existing fitted detector only with --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the fitted detector in --out (its thresholds too, unless this fit calibrates)",
    )
    p.add_argument(
        "--calibrate",
        type=Path,
        help="folder of held-out NORMAL images: thresholds from the --quantile of their scores, saved too",
    )
    p.add_argument("--quantile", type=float, help="calibration quantile (default 0.99)")
    p.add_argument("--skip-bad", action="store_true", help="continue past unreadable images, listing them")
    fit_many.add_options(p)
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipfusion.calibration import calibrate
    from clipfusion.data.checks import check_calibration_overlap, check_images, collect_images
    from clipfusion.detector import CLIPFusion
    from clipfusion.fitted import DETECTOR_FILE, describe_existing
    from clipfusion.outputs.folders import check_creatable, check_input_folder
    from clipfusion.thresholds import DEFAULT_QUANTILE

    if fit_many.asked(args):
        return fit_many.run(args)
    if not args.object:
        raise ConfigError(
            "give --object NAME (and --refs for few-shot), or --refs-root DIR or --dataset for several"
        )
    if args.quantile is not None and not 0.0 < args.quantile <= 1.0:
        raise ConfigError(f"--quantile must lie in (0, 1], got {args.quantile}")
    if args.quantile is not None and not args.calibrate:
        raise ConfigError("--quantile needs --calibrate")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out names an existing file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / DETECTOR_FILE).is_file():
        raise InputError(f"{out}: --out is not empty and holds no fitted detector; choose a new folder")
    existing = describe_existing(out)
    if existing and not args.overwrite:
        raise InputError(
            f"{out}: holds a fitted detector ({existing}); add --overwrite to replace it, or choose another "
            "--out"
        )
    check_creatable(out, "--out")
    args.on_interrupt = lambda: f"a fit is saved to {out} only at its end; run the same command again"
    if args.calibrate is not None:
        check_input_folder(args.calibrate, "--calibrate")
    config = build_config(args)
    check_weights(config, args)
    progress = show_progress(args)
    mine = [out]
    refs, problems = collect_images(args.refs, exclude=mine) if args.refs else ([], [])
    calib, calib_problems = collect_images([args.calibrate], exclude=mine) if args.calibrate else ([], [])
    problems += calib_problems
    refs, bad_refs = check_images(refs, progress, desc="checking references")
    calib, bad_calib = check_images(calib, progress, desc="checking calibration images")
    skipped = bad_refs + bad_calib
    if problems or (skipped and not args.skip_bad):
        for line in problems + skipped:
            err(line)
        if skipped and not problems:
            err("use --skip-bad to continue without the unreadable images")
        return EXIT_USAGE
    if args.refs and not refs:
        err("no readable reference image")
        return EXIT_USAGE
    if args.calibrate and not calib:
        err(f"{args.calibrate}: no readable calibration image")
        return EXIT_USAGE
    for line in skipped:
        warn(f"skipped: {line}")
    check_calibration_overlap(calib, refs)

    banner = random_weights_banner(config)
    if banner:
        warn(banner)
    start = time.perf_counter()
    say(f"[1/4] loading models ({config.preset} configuration)")
    # the object is known before loading: its prompts are encoded and the text encoders freed before the
    # image models load (the lowest peak memory)
    detector = CLIPFusion(config, weights_dir=weights_dir(args), objects=[args.object])
    regime = f"{len(refs)}-shot" if refs else "zero-shot"
    say(f"[2/4] fitting {args.object!r} ({regime})")
    detector.fit(args.object, refs)
    thresholds = None
    if calib:
        q = args.quantile if args.quantile is not None else DEFAULT_QUANTILE
        say(f"[3/4] calibrating on {len(calib)} normal images (quantile {q})")
        thresholds = calibrate(detector, calib, q, batch_size=args.batch_size, progress=progress)
        say(f"      threshold {thresholds.image:.6f}, pixel threshold {thresholds.pixel:.6f}")
    else:
        say("[3/4] no --calibrate: no thresholds saved (predict --threshold/--calibrate can set them)")
    if existing:
        lost = (
            " (its calibrated thresholds go: this fit has none)"
            if "thresholds" in existing and not thresholds
            else ""
        )
        say(f"[4/4] replacing the fitted detector in {out}: {existing}{lost}")
    else:
        say(f"[4/4] saving to {out}")
    detector.save(out, thresholds)
    say(f"fitted {detector.object_name!r} ({regime}) in {time.perf_counter() - start:.1f} s: {out}")
    return EXIT_OK
