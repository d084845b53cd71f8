"""``clipfusion predict --engine ray``: the command-line side of :func:`clipfusion.distributed.predict` (the
driver, the workers and Ray itself live in :mod:`clipfusion.distributed`, which knows no command line).

The distributed path scores with a saved fit only (``--fitted``): fitting or calibrating belongs on one
machine, once (``clipfusion fit --calibrate``), and every worker must use the very same fit.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from clipfusion.cli.options import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    check_weights,
    err,
    read_fitted,
    say,
    show_progress,
    warn,
    weights_dir,
)
from clipfusion.errors import ConfigError
from clipfusion.provenance import random_weights_banner

#: lines of unreadable or failed inputs printed before "… and N more (see skipped.csv)"
SHOWN = 10


def run(args: argparse.Namespace) -> int:
    from clipfusion.distributed import predict
    from clipfusion.outputs.folders import check_input_file
    from clipfusion.thresholds import Thresholds

    if not args.fitted:
        raise ConfigError(
            "--engine ray scores with a saved fit: give --fitted DIR (made by `clipfusion fit`)"
        )
    if args.calibrate is not None:
        raise ConfigError(
            "--calibrate does not run on --engine ray: calibrate once with `clipfusion fit --calibrate`, or "
            "pass --thresholds FILE"
        )
    if args.quantile is not None:
        raise ConfigError("--quantile needs --calibrate, which does not run on --engine ray")
    records = read_fitted(args)  # refuses --object, --refs, --preset … in one line before Ray starts
    for record in records.values():
        check_weights(record.config, args)
    if len(records) > 1:
        return _report(args, _run_many(args, records))
    fitted = next(iter(records.values()))
    banner = random_weights_banner(fitted.config)
    if banner:  # as the local engine says it, before any score is shown
        warn(banner)
    thresholds = None
    if args.thresholds is not None:
        thresholds = Thresholds.load(check_input_file(args.thresholds, "--thresholds"))
    summary = predict(
        fitted.path,
        args.images,
        args.out,
        address=args.address,
        workers=args.workers if args.workers is not None else 1,
        gpus_per_worker=args.gpus_per_worker or 0.0,
        cpus_per_worker=args.cpus_per_worker if args.cpus_per_worker is not None else 1.0,
        batch_size=args.batch_size,
        threshold=args.threshold,
        pixel_threshold=args.pixel_threshold,
        thresholds=thresholds,
        normalize=args.normalize,
        resume=args.resume,
        overwrite=args.overwrite,
        report_top=args.report_top,
        weights_dir=weights_dir(args),
        device=args.device,
        progress=show_progress(args),
    )
    return _report(args, summary)


def _run_many(args: argparse.Namespace, records: dict[str, Any]) -> Any:
    """``--fitted A B C --engine ray``: every worker holds one copy of the models and every object."""
    from clipfusion.distributed import predict_line

    per_fit = [o for o in ("thresholds", "threshold", "pixel_threshold") if getattr(args, o) is not None]
    if per_fit:
        options = ", ".join(f"--{o.replace('_', '-')}" for o in per_fit)
        raise ConfigError(
            f"{options}: with several fitted objects each keeps the thresholds of its own fit "
            "(`clipfusion fit --calibrate`); drop them, or score the objects one by one"
        )
    for name, record in records.items():
        banner = random_weights_banner(record.config)
        if banner:
            warn(f"{name}: {banner}")
    return predict_line(
        {name: record.path for name, record in records.items()},
        args.images,
        args.out,
        address=args.address,
        workers=args.workers if args.workers is not None else 1,
        gpus_per_worker=args.gpus_per_worker or 0.0,
        cpus_per_worker=args.cpus_per_worker if args.cpus_per_worker is not None else 1.0,
        batch_size=args.batch_size,
        normalize=args.normalize,
        resume=args.resume,
        overwrite=args.overwrite,
        report_top=args.report_top,
        weights_dir=weights_dir(args),
        device=args.device,
        progress=show_progress(args),
    )


def _report(args: argparse.Namespace, summary: Any) -> int:
    """What a run did, in lines; the exit status (2 for inputs left out without --skip-bad)."""
    done = f"{summary.scored} of {summary.images} images scored"
    if summary.resumed:
        done += f" ({summary.resumed} already complete before this run)"
    say(
        f"{done} in {summary.seconds:.1f} s on {summary.workers} Ray worker{'s' * (summary.workers != 1)}; "
        f"outputs in {summary.out} "
        f"({summary.images_per_second:.2f} images/s this run)"
    )
    status = EXIT_OK
    if summary.scored == 0:
        err("no input image could be scored (see skipped.csv)")
        status = EXIT_USAGE
    if summary.skipped:
        report = err if not args.skip_bad else warn
        _lines(report, summary.skipped, "unreadable")
        if not args.skip_bad:
            err(
                f"{len(summary.skipped)} unreadable inputs left out (every other image is scored); add "
                "--skip-bad to accept that"
            )
            status = EXIT_USAGE
    if summary.failed:
        _lines(err, summary.failed, "failed")
        err(f"{len(summary.failed)} images could not be scored; --resume tries them again")
        status = status or EXIT_ERROR  # an input problem (2) already reported stays the exit status
    return status


def _lines(emit: Callable[[str], None], items: list[tuple[str, str]], what: str) -> None:
    for _path, problem in items[:SHOWN]:
        emit(f"{what}: {problem}")
    if len(items) > SHOWN:
        emit(f"… and {len(items) - SHOWN} more, listed in skipped.csv")
