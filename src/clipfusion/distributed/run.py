"""The driver of a distributed prediction run on Ray Data (see :func:`predict`)."""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pyarrow.compute as pc

from clipfusion.distributed import records as rec
from clipfusion.distributed.inputs import is_url, resolve_inputs, with_output_names
from clipfusion.distributed.session import (
    ACTOR_PREFIX,
    MAX_TASK_RETRIES,
    PATTERNS,
    RunFolder,
    RunSummary,
    check_resources,
    connect,
    cut_blocks,
    default_batch_size,
    execute,
    fitted_files,
    quiet_ray_data,
    require_ray,
    restore_ray_data,
    write_report,
)
from clipfusion.distributed.worker import (
    FAILED,
    OK,
    OVERLAY_SCHEMA,
    RECORD_SCHEMA,
    SKIPPED,
    ScoreBatch,
    draw_overlays,
)
from clipfusion.errors import ConfigError
from clipfusion.outputs import report
from clipfusion.progress import progress_bar

if TYPE_CHECKING:
    from clipfusion.thresholds import Thresholds

log = logging.getLogger(__name__)


def predict(
    fitted: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    address: str | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    batch_size: int | None = None,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    thresholds: Thresholds | None = None,
    normalize: str = "set",
    resume: bool = False,
    overwrite: bool = False,
    report_top: int | None = report.REPORT_TOP,
    weights_dir: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    banner: str | None = None,
) -> RunSummary:
    """Score ``inputs`` (image files, folders, or ``.txt``/``.csv``/``.parquet`` lists of paths) with the
    detector saved in ``fitted``, on a Ray cluster, and write what a local ``predict`` writes to ``out``.

    - ``address``: a running cluster (``"auto"`` or ``"HOST:PORT"``); default: a Ray instance private to
      this call (a Ray instance this process already started is always used as it is).
    - ``workers`` actors, each loading the detector once and holding ``cpus_per_worker`` CPUs and
      ``gpus_per_worker`` GPUs (on CUDA then); ``batch_size`` images per call (default: the fit's own).
    - Thresholds: ``thresholds`` (checked against the fit), else the fit's own; ``threshold`` /
      ``pixel_threshold`` override either. A pixel threshold gives masks.
    - ``normalize="set"`` (default, as a local run): overlays share one colour scale, drawn in a second,
      model-free pass once every map exists; ``"image"``: each overlay on its own scale, in one pass.
    - ``resume``: continue a run in ``out``, skipping inputs whose outputs are complete; ``overwrite``:
      replace an earlier run there. The report shows the ``report_top`` highest scores (None: all).

    Unreadable inputs and images the model fails on never stop the run: they are left out of the scores,
    listed in ``skipped.csv`` and returned in the summary. Paths (inputs, ``out``, ``weights_dir``) must
    mean the same file on every machine of the cluster (a shared file system).
    """
    from clipfusion import fitted as fitted_mod
    from clipfusion.config import check_batch_size, save_config
    from clipfusion.outputs.predictions import write_skipped_csv
    from clipfusion.provenance import WEIGHTS_NOTE, random_weights_banner, weights_kind
    from clipfusion.thresholds import check_thresholds_for

    started = time.perf_counter()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {workers!r}")
    if gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker must be 0 or more, got {gpus_per_worker}")
    if cpus_per_worker <= 0:
        raise ConfigError(f"--cpus-per-worker must be positive, got {cpus_per_worker}")
    check_batch_size(batch_size, "--batch-size")
    if normalize not in report.NORMALISATIONS:
        raise ConfigError(f"--normalize must be one of {', '.join(report.NORMALISATIONS)}")
    if report_top is not None and report_top < 1:
        raise ConfigError(f"--report-top must be at least 1, got {report_top}")
    if resume and overwrite:
        raise ConfigError("give either --resume or --overwrite, not both")
    if is_url(out):
        raise ConfigError(
            f"{out}: --out must be a folder path every worker can write (a shared or mounted file system); "
            "URLs are not supported"
        )

    record = fitted_mod.read(fitted)
    config = record.config
    view = SimpleNamespace(config=config, object_name=record.object_name, references=record.reference_names)
    if thresholds is not None:
        check_thresholds_for(thresholds, view, "thresholds")
    chosen = thresholds if thresholds is not None else record.thresholds
    image_t = threshold if threshold is not None else (chosen.image if chosen else None)
    pixel_t = pixel_threshold if pixel_threshold is not None else (chosen.pixel if chosen else None)
    if chosen is not None:
        chosen = chosen.with_values(image_t, pixel_t)
    masks = pixel_t is not None
    weights = weights_kind(config)
    png_text = {"clipfusion-weights": WEIGHTS_NOTE[weights]}
    if banner is None:
        banner = random_weights_banner(config)

    payload = fitted_files(record)
    run = {
        "fitted": hashlib.sha256(payload[fitted_mod.DETECTOR_FILE]).hexdigest(),
        "threshold": image_t,
        "pixel_threshold": pixel_t,
        "normalize": normalize,
    }
    folder = RunFolder(out, overwrite=overwrite, resume=resume)
    folder.check(run)
    table = with_output_names(resolve_inputs(inputs, exclude=[out]), masks=masks)
    batch = batch_size or default_batch_size(config)

    ray = require_ray()
    connected = connect(ray, address)
    saved_ctx: dict[str, Any] = {}
    try:
        check_resources(ray, workers, cpus_per_worker, gpus_per_worker)
        saved_ctx = quiet_ray_data(ray)
        fixed = ["scores.csv", "scores.parquet", "config.json", "report.html"]
        resumed_run = folder.open_run(
            run,
            fixed + (["thresholds.json"] if chosen is not None else []),
            command="predict",
            images=table.num_rows,
            weights=weights,
            weights_note=WEIGHTS_NOTE[weights],
            fitted_detector=str(record.path),
        )
        root = folder.path.resolve()

        # -- what is left to do -------------------------------------------------------------------------
        done_before = rec.join_records(
            table, rec.read_parts(root, rec.SCORES, RECORD_SCHEMA), ["path", "map"]
        )
        complete = pc.equal(done_before.column("status"), OK).fill_null(False)
        complete = pc.and_(complete, rec.present(done_before.column("map"), rec.listing(root, "maps")))
        if masks:
            complete = pc.and_(complete, rec.present(done_before.column("mask"), rec.listing(root, "masks")))
        if normalize == "image":
            overlays = rec.listing(root, "overlays")
            complete = pc.and_(complete, rec.present(done_before.column("overlay"), overlays))
        skipped_before = int(pc.sum(complete).as_py() or 0)
        # whole batches: an image is always scored in the batch of the same neighbours (a batch is the
        # input list cut every `batch` rows), so a resumed or retried run writes the very same bytes
        group = pc.divide(table.column("index"), batch)
        pending = table.filter(pc.is_in(group, value_set=pc.unique(group.filter(pc.invert(complete)))))
        if resumed_run:
            log.info(f"resuming: {skipped_before} of {table.num_rows} images already complete")

        # -- pass 1: score, write maps, masks (and per-image overlays) ---------------------------------
        n_actors = 0
        scored_now = 0
        if pending.num_rows:
            blocks = cut_blocks(pending, batch)
            n_actors = min(workers, len(blocks))
            payload_ref = ray.put(payload)
            counter = itertools.count()
            run_id = secrets.token_hex(3)
            log.info(
                f"scoring {pending.num_rows} images on Ray: {n_actors} workers × {cpus_per_worker:g} CPU"
                + (f" + {gpus_per_worker:g} GPU" if gpus_per_worker else "")
                + f", {batch} images a batch"
            )
            with warnings.catch_warnings():
                # the named-actor hook and the retry settings are deprecated after the Ray range we pin
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*", category=DeprecationWarning)
                ds = ray.data.from_arrow(blocks).map_batches(
                    ScoreBatch,
                    batch_size=batch,
                    batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(size=n_actors),
                    num_cpus=cpus_per_worker,
                    num_gpus=gpus_per_worker or None,
                    fn_constructor_kwargs={
                        # a reference, not the bytes: a restarted actor fetches the folder again
                        "fitted_files": [payload_ref],
                        "fitted_path": str(record.path),
                        "out": str(root),
                        "weights_dir": str(weights_dir) if weights_dir is not None else None,
                        "device": device or ("cuda" if gpus_per_worker else None),
                        "threads": max(1, int(cpus_per_worker)),
                        "batch_size": batch,
                        "pixel_threshold": pixel_t,
                        "overlays": normalize == "image",
                        "png_text": png_text,
                    },
                    max_restarts=-1,
                    max_task_retries=MAX_TASK_RETRIES,
                    ray_remote_args_fn=lambda: {"name": f"{ACTOR_PREFIX}-{run_id}-{next(counter)}"},
                )
            writer = rec.PartsWriter(root, rec.SCORES, RECORD_SCHEMA)
            try:
                scored_now = execute(
                    ds, writer, progress_bar(pending.num_rows, "predict (ray)", enabled=progress)
                )
            except BaseException:
                if not resumed_run and not rec.read_parts(root, rec.SCORES, RECORD_SCHEMA):
                    folder.abandon()
                raise

        joined = rec.join_records(table, rec.read_parts(root, rec.SCORES, RECORD_SCHEMA), ["path", "map"])
        ok = pc.equal(joined.column("status"), OK).fill_null(False)
        overlay_problems: dict[str, str] = {}

        # -- pass 2: overlays on the set's colour scale ------------------------------------------------
        if normalize == "set" and pc.any(ok).as_py():
            scored = joined.filter(ok)
            vmin, vmax = pc.min(scored.column("map_min")).as_py(), pc.max(scored.column("map_max")).as_py()
            drawn = rec.join_records(
                scored.select(["index", "path", "source", "map", "overlay"]),
                rec.read_parts(root, rec.OVERLAYS, OVERLAY_SCHEMA),
                ["path", "overlay"],
            )
            current = pc.and_(
                pc.and_(pc.equal(drawn.column("status"), OK), pc.equal(drawn.column("vmin"), vmin)),
                pc.equal(drawn.column("vmax"), vmax),
            ).fill_null(False)
            current = pc.and_(current, rec.present(drawn.column("overlay"), rec.listing(root, "overlays")))
            todo = drawn.filter(pc.invert(current)).select(["index", "path", "source", "map", "overlay"])
            if todo.num_rows:
                log.info(
                    f"drawing {todo.num_rows} overlays on the set's colour scale [{vmin:.4g}, {vmax:.4g}]"
                )
                ds = ray.data.from_arrow(cut_blocks(todo, max(batch, 16))).map_batches(
                    draw_overlays,
                    batch_size=None,
                    batch_format="pyarrow",
                    num_cpus=1,
                    fn_kwargs={"out": str(root), "vmin": vmin, "vmax": vmax, "png_text": png_text},
                )
                writer = rec.PartsWriter(root, rec.OVERLAYS, OVERLAY_SCHEMA)
                execute(ds, writer, progress_bar(todo.num_rows, "overlays (ray)", enabled=progress))
            drawn = rec.join_records(
                scored.select(["index", "path", "overlay"]),
                rec.read_parts(root, rec.OVERLAYS, OVERLAY_SCHEMA),
                ["path", "overlay"],
            )
            bad = drawn.filter(pc.invert(pc.equal(drawn.column("status"), OK).fill_null(False)))
            # an image that vanished between the passes: no row may name an overlay that is not there
            overlay_problems = dict(
                zip(bad.column("path").to_pylist(), bad.column("problem").to_pylist(), strict=True)
            )
            if overlay_problems:
                ok = pc.and_(ok, pc.invert(pc.is_in(joined.column("path"), value_set=bad.column("path"))))

        # -- the run-wide files ------------------------------------------------------------------------
        scored = joined.filter(ok)
        rec.write_scores(root, scored, threshold=image_t, masks=masks, weights=weights)
        left_out = joined.filter(pc.invert(ok))
        skipped: list[tuple[str, str]] = []
        failed: list[tuple[str, str]] = []
        left_rows: list[tuple[str, str]] = []  # both, in input order (as a local run lists them)
        lost_line = (
            f"not scored: its batch failed on every try ({MAX_TASK_RETRIES + 1} workers died on it); "
            "run again with --resume"
        )
        for path, state, problem in zip(
            left_out.column("path").to_pylist(),
            left_out.column("status").to_pylist(),
            left_out.column("problem").to_pylist(),
            strict=True,
        ):
            if state == OK:
                state, problem = FAILED, overlay_problems.get(path) or f"{path}: overlay missing"
            left_rows.append((path, problem or f"{path}: {lost_line}"))
            (skipped if state == SKIPPED else failed).append(left_rows[-1])
        if left_rows:
            write_skipped_csv(root / "skipped.csv", left_rows)
            folder.manifest["files"] = sorted(set(folder.manifest["files"]) | {"skipped.csv"})
        else:
            (root / "skipped.csv").unlink(missing_ok=True)
        save_config(config if device is None else config.replace(device=device), root / "config.json")
        if chosen is not None:
            chosen.save(root / "thresholds.json")
        shots = len(record.references)
        write_report(
            root,
            scored,
            top=report_top,
            threshold=image_t,
            title=f"clipfusion: {record.object_name}",
            banner=banner or "",
            details={
                "object": record.object_name,
                "references": f"{shots} ({'few-shot' if shots else 'zero-shot'})",
                "preset": config.preset,
                "fitted detector": str(record.path),
                "engine": f"Ray Data, {max(n_actors, 1)} workers",
                **({"skipped (unreadable)": str(len(skipped))} if skipped else {}),
                **({"failed": str(len(failed))} if failed else {}),
                "weights": WEIGHTS_NOTE[weights],
                "normalisation": normalize,
                **({"threshold": f"{image_t:.6f}"} if image_t is not None else {}),
                **({"pixel threshold": f"{pixel_t:.6f}"} if pixel_t is not None else {}),
            },
        )
        folder.manifest.update(scored=scored.num_rows, skipped=len(skipped), failed=len(failed))
        folder.close()
    finally:
        if saved_ctx:
            restore_ray_data(ray, saved_ctx)
        if connected:
            ray.shutdown()
    return RunSummary(
        out=folder.path,
        images=table.num_rows,
        scored=scored.num_rows,
        scored_now=scored_now,
        resumed=skipped_before,
        workers=n_actors,
        seconds=time.perf_counter() - started,
        skipped=skipped,
        failed=failed,
    )


__all__ = [
    "ACTOR_PREFIX",
    "MAX_TASK_RETRIES",
    "PATTERNS",
    "RunFolder",
    "RunSummary",
    "predict",
    "require_ray",
]
