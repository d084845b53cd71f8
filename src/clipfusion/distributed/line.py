"""The driver of a distributed run over several fitted objects (a production line's mixed batch) on Ray Data.

Every worker holds one copy of the models and every fitted object on it
(:class:`~clipfusion.detector_set.DetectorSet`); each input goes to its object (a ``.csv``/``.parquet`` list
with ``path`` and ``object`` columns, or a folder of sub-folders named after the objects:
:func:`clipfusion.data.routing.route_inputs`). The inputs are cut into blocks of one object each, every
``batch`` images of that object's list, so that each image is scored in the very batch a local run of that
object alone scores it in — the same maps, bit for bit.

The output folder is the one a local run over several objects writes (:func:`clipfusion.outputs.predictions.
write_line_predictions`): ``OUT/<object>/`` as a run of that object alone (its maps, overlays, masks, scores,
configuration, thresholds, report), and across them ``OUT/scores.csv`` / ``scores.parquet`` (every row with
its ``object``), ``OUT/skipped.csv`` and ``OUT/report.html``. ``--resume`` continues as for one object.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import secrets
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from clipfusion import fitted as fitted_format
from clipfusion.distributed import records as rec
from clipfusion.distributed.inputs import is_url, output_stems
from clipfusion.distributed.session import (
    ACTOR_PREFIX,
    MAX_TASK_RETRIES,
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
from clipfusion.errors import ConfigError, InputErrors
from clipfusion.files import atomic_write_text
from clipfusion.outputs import report
from clipfusion.progress import progress_bar
from clipfusion.provenance import WEIGHTS_NOTE, random_weights_banner, weights_kind

log = logging.getLogger(__name__)

#: the per-image files of a run over several objects, by pattern (one sub-folder per object)
LINE_PATTERNS = ("*/maps/**/*.npy", "*/overlays/**/*.png", "*/masks/**/*.png", f"{rec.PARTS}/*.parquet")


def _table(
    routed: Sequence[tuple[Path, str]], masks: Mapping[str, bool], batch: int
) -> tuple[pa.Table, pa.Array]:
    """The inputs with their object and output files, grouped by object in the order objects first appear
    (each object's inputs in their given order), and each row's batch key (object, position // batch)."""
    import os

    names = list(dict.fromkeys(name for _, name in routed))
    columns: dict[str, list[Any]] = {k: [] for k in ("path", "source", "object", "map", "overlay", "mask")}
    keys: list[str] = []
    for name in names:
        paths = [str(path) for path, of in routed if of == name]
        stems = output_stems(pa.array(paths, type=pa.string()))
        for position, (path, stem) in enumerate(zip(paths, stems, strict=True)):
            columns["path"].append(path)
            columns["source"].append(os.path.abspath(path))
            columns["object"].append(name)
            columns["map"].append(f"{name}/maps/{stem}.npy")
            columns["overlay"].append(f"{name}/overlays/{stem}.png")
            columns["mask"].append(f"{name}/masks/{stem}.png" if masks[name] else None)
            keys.append(f"{name}\0{position // batch}")
    table = pa.table({k: pa.array(v, type=pa.string()) for k, v in columns.items()})
    table = table.append_column("index", pa.array(range(table.num_rows), type=pa.int64()))
    return table, pa.array(keys, type=pa.string())


def _object_blocks(table: pa.Table, batch: int) -> list[pa.Table]:
    """Blocks of one object each, cut every ``batch`` rows of that object's inputs (a local run's batches)."""
    blocks: list[pa.Table] = []
    objects = table.column("object")
    for name in dict.fromkeys(objects.to_pylist()):
        blocks += cut_blocks(table.filter(pc.equal(objects, name)), batch)
    return blocks


def _relative(table: pa.Table, name: str) -> pa.Table:
    """An object's rows with their files relative to its own folder (as a run of that object alone)."""
    prefix = f"^{name}/"
    for column in ("map", "overlay", "mask"):
        if column in table.column_names:
            index = table.column_names.index(column)
            relative = pc.replace_substring_regex(table.column(column), prefix, "")
            table = table.set_column(index, column, relative)
    return table


def predict_line(
    fitted: Mapping[str, str | Path],
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    address: str | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    batch_size: int | None = None,
    normalize: str = "set",
    resume: bool = False,
    overwrite: bool = False,
    report_top: int | None = report.REPORT_TOP,
    weights_dir: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> RunSummary:
    """Score a mixed batch of several fitted objects (``{name: folder}``) on a Ray cluster: the options of
    :func:`clipfusion.distributed.predict`, with each object's thresholds those of its own fit."""
    from clipfusion.config import check_batch_size, save_config
    from clipfusion.data.routing import route_inputs
    from clipfusion.outputs.predictions import write_skipped_csv

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
            f"{out}: --out must be a folder path every worker can write; URLs are not supported"
        )

    records = {name: fitted_format.read(path) for name, path in fitted.items()}
    names = list(records)
    routed, problems = route_inputs(inputs, names, exclude=[out])
    if problems:
        raise InputErrors(problems)
    if not routed:
        raise ConfigError("no input image given")
    used = list(dict.fromkeys(name for _, name in routed))
    configs = {name: records[name].config for name in used}
    thresholds = {name: records[name].thresholds for name in used}
    kinds = {name: weights_kind(configs[name]) for name in used}
    png_text = {name: {"clipfusion-weights": WEIGHTS_NOTE[kinds[name]]} for name in used}
    batch = batch_size or min(default_batch_size(configs[name]) for name in used)
    masks = {name: thresholds[name] is not None for name in used}
    payload = {name: fitted_files(records[name]) for name in used}
    run = {
        "fitted": {
            name: hashlib.sha256(payload[name][fitted_format.DETECTOR_FILE]).hexdigest() for name in used
        },
        "normalize": normalize,
        "batch": batch,
    }
    folder = RunFolder(out, overwrite=overwrite, resume=resume)
    folder.check(run)
    table, batch_keys = _table(routed, masks, batch)

    ray = require_ray()
    connected = connect(ray, address)
    saved_ctx: dict[str, Any] = {}
    try:
        check_resources(ray, workers, cpus_per_worker, gpus_per_worker)
        saved_ctx = quiet_ray_data(ray)
        fixed = ["scores.csv", "scores.parquet", "report.html"]
        for name in used:
            fixed += [f"{name}/{f}" for f in ("scores.csv", "scores.parquet", "config.json", "report.html")]
            fixed += [f"{name}/manifest.json"] + ([f"{name}/thresholds.json"] if masks[name] else [])
        weights = "random" if "random" in kinds.values() else "pretrained"
        resumed_run = folder.open_run(
            run,
            fixed,
            patterns=LINE_PATTERNS,
            command="predict",
            images=table.num_rows,
            objects=used,
            weights=weights,
            weights_note=WEIGHTS_NOTE[weights],
            fitted_detectors={name: str(records[name].path) for name in used},
        )
        root = folder.path.resolve()

        # -- what is left to do: whole batches of one object, as for one object ------------------------
        done_before = rec.join_records(
            table, rec.read_parts(root, rec.SCORES, RECORD_SCHEMA), ["path", "map"]
        )
        listed: set[str] = set()
        for name in used:
            for sub in ("maps", "masks", "overlays"):
                listed |= rec.listing(root, f"{name}/{sub}")
        complete = pc.equal(done_before.column("status"), OK).fill_null(False)
        complete = pc.and_(complete, rec.present(done_before.column("map"), listed))
        with_mask = pc.is_valid(done_before.column("mask"))
        mask_ok = pc.or_(
            pc.invert(with_mask), rec.present(done_before.column("mask"), listed).fill_null(False)
        )
        complete = pc.and_(complete, mask_ok)
        if normalize == "image":
            complete = pc.and_(complete, rec.present(done_before.column("overlay"), listed))
        skipped_before = int(pc.sum(complete).as_py() or 0)
        keys = batch_keys.take(done_before.column("index"))
        pending = table.filter(pc.is_in(batch_keys, value_set=pc.unique(keys.filter(pc.invert(complete)))))
        if resumed_run:
            log.info(f"resuming: {skipped_before} of {table.num_rows} images already complete")

        # -- pass 1: score every object's inputs on workers holding every object -----------------------
        n_actors = 0
        scored_now = 0
        if pending.num_rows:
            blocks = _object_blocks(pending, batch)
            n_actors = min(workers, len(blocks))
            payload_ref = ray.put(payload)
            counter = itertools.count()
            run_id = secrets.token_hex(3)
            log.info(
                f"scoring {pending.num_rows} images of {len(used)} objects on Ray: {n_actors} workers × "
                f"{cpus_per_worker:g} CPU"
                + (f" + {gpus_per_worker:g} GPU" if gpus_per_worker else "")
                + f", {batch} images a batch, one copy of the models per worker"
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*", category=DeprecationWarning)
                ds = ray.data.from_arrow(blocks).map_batches(
                    ScoreBatch,
                    batch_size=None,  # a block is one batch of one object
                    batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(size=n_actors),
                    num_cpus=cpus_per_worker,
                    num_gpus=gpus_per_worker or None,
                    fn_constructor_kwargs={
                        "fitted_files": [payload_ref],
                        "fitted_path": {name: str(records[name].path) for name in used},
                        "out": str(root),
                        "weights_dir": str(weights_dir) if weights_dir is not None else None,
                        "device": device or ("cuda" if gpus_per_worker else None),
                        "threads": max(1, int(cpus_per_worker)),
                        "batch_size": batch,
                        "pixel_threshold": {
                            name: t.pixel if t is not None else None for name, t in thresholds.items()
                        },
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

        # -- pass 2: each object's overlays on the colour scale of its own set -------------------------
        overlay_problems: dict[str, str] = {}
        if normalize == "set":
            drawn_all = rec.read_parts(root, rec.OVERLAYS, OVERLAY_SCHEMA)
            for name in used:
                scored = joined.filter(pc.and_(ok, pc.equal(joined.column("object"), name)))
                if not scored.num_rows:
                    continue
                vmin = pc.min(scored.column("map_min")).as_py()
                vmax = pc.max(scored.column("map_max")).as_py()
                drawn = rec.join_records(
                    scored.select(["index", "path", "source", "map", "overlay"]),
                    drawn_all,
                    ["path", "overlay"],
                )
                current = pc.and_(
                    pc.and_(pc.equal(drawn.column("status"), OK), pc.equal(drawn.column("vmin"), vmin)),
                    pc.equal(drawn.column("vmax"), vmax),
                ).fill_null(False)
                current = pc.and_(
                    current, rec.present(drawn.column("overlay"), rec.listing(root, f"{name}/overlays"))
                )
                todo = drawn.filter(pc.invert(current)).select(["index", "path", "source", "map", "overlay"])
                if todo.num_rows:
                    log.info(
                        f"{name}: drawing {todo.num_rows} overlays on its scale [{vmin:.4g}, {vmax:.4g}]"
                    )
                    ds = ray.data.from_arrow(cut_blocks(todo, max(batch, 16))).map_batches(
                        draw_overlays,
                        batch_size=None,
                        batch_format="pyarrow",
                        num_cpus=1,
                        fn_kwargs={"out": str(root), "vmin": vmin, "vmax": vmax, "png_text": png_text[name]},
                    )
                    writer = rec.PartsWriter(root, rec.OVERLAYS, OVERLAY_SCHEMA)
                    execute(
                        ds, writer, progress_bar(todo.num_rows, f"overlays {name} (ray)", enabled=progress)
                    )
            drawn = rec.join_records(
                joined.filter(ok).select(["index", "path", "overlay"]),
                rec.read_parts(root, rec.OVERLAYS, OVERLAY_SCHEMA),
                ["path", "overlay"],
            )
            bad = drawn.filter(pc.invert(pc.equal(drawn.column("status"), OK).fill_null(False)))
            overlay_problems = dict(
                zip(bad.column("path").to_pylist(), bad.column("problem").to_pylist(), strict=True)
            )
            if overlay_problems:
                ok = pc.and_(ok, pc.invert(pc.is_in(joined.column("path"), value_set=bad.column("path"))))

        # -- each object's folder, as a run of that object alone ---------------------------------------
        left_rows: list[tuple[str, str, str]] = []
        lost = (
            f"not scored: its batch failed on every try ({MAX_TASK_RETRIES + 1} workers died on it); "
            "run again with --resume"
        )
        left = joined.filter(pc.invert(ok))
        skipped: list[tuple[str, str]] = []
        failed: list[tuple[str, str]] = []
        for path, name, state, problem in zip(
            left.column("path").to_pylist(),
            left.column("object").to_pylist(),
            left.column("status").to_pylist(),
            left.column("problem").to_pylist(),
            strict=True,
        ):
            if state == OK:
                state, problem = FAILED, overlay_problems.get(path) or f"{path}: overlay missing"
            line = (path, problem or f"{path}: {lost}")
            left_rows.append((line[0], name, line[1]))
            (skipped if state == SKIPPED else failed).append(line)
        summary = []
        for name in used:
            mine = joined.filter(pc.and_(ok, pc.equal(joined.column("object"), name)))
            folder_of = root / name
            t = thresholds[name]
            rec.write_scores(
                folder_of,
                _relative(mine, name),
                threshold=t.image if t else None,
                masks=masks[name],
                weights=kinds[name],
            )
            mine_left = [(p, problem) for p, of, problem in left_rows if of == name]
            if mine_left:
                write_skipped_csv(folder_of / "skipped.csv", mine_left)
            config = configs[name] if device is None else configs[name].replace(device=device)
            save_config(config, folder_of / "config.json")
            if t is not None:
                t.save(folder_of / "thresholds.json")
            record = records[name]
            shots = len(record.references)
            banner = random_weights_banner(config)
            write_report(
                folder_of,
                _relative(mine, name),
                top=report_top,
                threshold=t.image if t else None,
                title=f"clipfusion: {record.object_name}",
                banner=banner,
                details={
                    "object": record.object_name,
                    "references": f"{shots} ({'few-shot' if shots else 'zero-shot'})",
                    "preset": config.preset,
                    "fitted detector": str(record.path),
                    "engine": f"Ray Data, {max(n_actors, 1)} workers",
                    "weights": WEIGHTS_NOTE[kinds[name]],
                    "normalisation": normalize,
                    **({"threshold": f"{t.image:.6f}", "pixel threshold": f"{t.pixel:.6f}"} if t else {}),
                },
            )
            files = ["scores.csv", "scores.parquet", "config.json", "report.html"]
            files += (["thresholds.json"] if t else []) + (["skipped.csv"] if mine_left else [])
            manifest = {
                "format": 1,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "complete": True,
                "command": "predict",
                "engine": "ray",
                "object": name,
                "part_of": "..",
                "files": sorted(files),
                "patterns": ["maps/*.npy", "overlays/*.png", "masks/*.png"],
            }
            atomic_write_text(folder_of / "manifest.json", json.dumps(manifest, indent=2) + "\n")
            scores = mine.column("score").to_pylist()
            anomalous = sum(1 for s in scores if t is not None and s > t.image) if t else None
            summary.append(
                {
                    "name": name,
                    "object": record.object_name,
                    "images": mine.num_rows,
                    "anomalous": anomalous,
                    "top": max(scores) if scores else None,
                    "report": f"{name}/report.html",
                }
            )
        scored_all = joined.filter(ok)
        _write_line_scores(root, scored_all, thresholds, kinds)
        if left_rows:
            write_skipped_csv(root / "skipped.csv", [(p, problem) for p, _, problem in left_rows])
            folder.manifest["files"] = sorted(set(folder.manifest["files"]) | {"skipped.csv"})
        else:
            (root / "skipped.csv").unlink(missing_ok=True)
        warning = " ".join(
            dict.fromkeys(b for b in (random_weights_banner(c) for c in configs.values()) if b)
        )
        report.write_html(root / "report.html", report.line_report(summary, banner=warning))
        folder.manifest.update(scored=scored_all.num_rows, skipped=len(skipped), failed=len(failed))
        folder.close()
    finally:
        if saved_ctx:
            restore_ray_data(ray, saved_ctx)
        if connected:
            ray.shutdown()
    return RunSummary(
        out=folder.path,
        images=table.num_rows,
        scored=scored_all.num_rows,
        scored_now=scored_now,
        resumed=skipped_before,
        workers=n_actors,
        seconds=time.perf_counter() - started,
        skipped=skipped,
        failed=failed,
    )


def _write_line_scores(
    root: Path, scored: pa.Table, thresholds: Mapping[str, Any], kinds: Mapping[str, str]
) -> None:
    """``scores.csv`` and ``scores.parquet`` across the objects: the columns of a local run over several
    objects (``path, object, score, decision, overlay, map, mask, weights``)."""
    import csv
    import io

    import pyarrow.parquet as pq

    from clipfusion.files import atomic_write_bytes
    from clipfusion.thresholds import decide

    objects = scored.column("object").to_pylist()
    scores = scored.column("score").to_pylist()
    decisions = [
        decide(s, thresholds[o].image) if thresholds.get(o) is not None else ""
        for s, o in zip(scores, objects, strict=True)
    ]
    masks = [m or "" for m in scored.column("mask").to_pylist()]
    table = pa.table(
        {
            "path": scored.column("path"),
            "object": scored.column("object"),
            "score": scored.column("score"),
            "decision": pa.array(decisions, type=pa.string()),
            "overlay": scored.column("overlay"),
            "map": scored.column("map"),
            "mask": pa.array(masks, type=pa.string()),
            "weights": pa.array([kinds[o] for o in objects], type=pa.string()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(root / "scores.parquet", buf.getvalue())
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(table.column_names)
    for row in zip(*(table.column(n).to_pylist() for n in table.column_names), strict=True):
        writer.writerow(
            [f"{v:.6f}" if n == "score" else v for n, v in zip(table.column_names, row, strict=True)]
        )
    atomic_write_text(root / "scores.csv", text.getvalue())


__all__ = ["LINE_PATTERNS", "predict_line"]
