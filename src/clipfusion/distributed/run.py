"""The driver of a distributed prediction run on Ray Data (see :func:`predict`)."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from clipfusion.distributed import records as rec
from clipfusion.distributed.inputs import is_url, resolve_inputs, with_output_names
from clipfusion.distributed.worker import (
    FAILED,
    OK,
    OVERLAY_SCHEMA,
    RECORD_SCHEMA,
    SKIPPED,
    ScoreBatch,
    draw_overlays,
)
from clipfusion.errors import ClipfusionError, ConfigError, InputError
from clipfusion.outputs import report
from clipfusion.outputs.folders import OutputFolder, read_manifest
from clipfusion.progress import progress_bar
from clipfusion.thresholds import decide

if TYPE_CHECKING:
    from clipfusion.fitted import FittedRecord
    from clipfusion.thresholds import Thresholds

log = logging.getLogger(__name__)

#: a batch whose worker dies is retried this many times on a restarted worker (Ray's max_task_retries);
#: workers themselves are restarted without limit (max_restarts=-1)
MAX_TASK_RETRIES = 3
#: at most this many Ray Data blocks: one block is one batch (the unit of retry) until the list is so long
#: that blocks of several batches keep the driver's bookkeeping small
MAX_BLOCKS = 20_000
#: the per-image files of a distributed run, named by pattern in its manifest instead of listed one by one
PATTERNS = ("maps/**/*.npy", "overlays/**/*.png", "masks/**/*.png", f"{rec.PARTS}/*.parquet")
ACTOR_PREFIX = "clipfusion-predict"


@dataclass
class RunSummary:
    """What a distributed run did. ``skipped``: unreadable inputs; ``failed``: inputs the model could not
    score (an error on that image, or a batch whose worker died on every retry), each with its problem."""

    out: Path
    images: int
    scored: int
    scored_now: int
    resumed: int
    workers: int
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.scored_now / self.seconds if self.seconds > 0 else 0.0


def require_ray() -> Any:
    """Ray and Ray Data, or one line saying how to install them."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ConfigError(
            f"the Ray engine needs Ray Data, which is not installed ({exc}); pip install 'clipfusion[ray]'"
        ) from exc
    return ray


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


class RunFolder(OutputFolder):
    """The output folder of a distributed run: its manifest names the per-image files by pattern (a million
    names would make a manifest of a hundred megabytes) and records what decides the outputs, so that
    ``--resume`` continues only the same run."""

    def __init__(self, path: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
        super().__init__(path, overwrite=overwrite)
        self.resume = resume
        self.created = False

    def _earlier(self) -> dict[str, Any] | None:
        return read_manifest(self.path) if self.resume and self.path.is_dir() else None

    def check(self, run: dict[str, Any] | None = None) -> None:
        """As for any run; with ``resume``, an earlier run there must be a Ray run of the same ``run``
        settings (the fit, the thresholds, the normalisation)."""
        earlier = self._earlier()
        if earlier is None:
            super().check()
            return
        if earlier.get("engine") != "ray":
            raise InputError(
                f"{self.path}: holds a run of the local engine; --resume continues a Ray run (use "
                "--overwrite to replace it)"
            )
        if run is not None:
            before, now = earlier.get("run") or {}, _canonical(run)
            differing = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            if differing:
                raise InputError(
                    f"{self.path}: the earlier run used another {', '.join(differing)}; --resume continues "
                    "the same run (use --overwrite to start again)"
                )

    def open_run(self, run: dict[str, Any], files: Sequence[str], **details: Any) -> bool:
        """Claim the folder (True: an earlier run of the same settings is continued)."""
        earlier = self._earlier()
        if earlier is None:
            self.created = not self.path.exists()
            self.open(files, engine="ray", run=_canonical(run), patterns=list(PATTERNS), **details)
            return False
        self.check(run)
        self.manifest = {
            **earlier,
            **details,
            "complete": False,
            "resumed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": sorted(set(earlier["files"]) | set(files)),
        }
        self._write_manifest()
        return True

    def abandon(self) -> None:
        """Undo :meth:`open_run` for a run that failed before writing anything (a folder of a run that
        could not even start would look like a run)."""
        if not self.created:
            return
        parts = self.path / rec.PARTS
        if parts.is_dir() and not any(parts.iterdir()):
            parts.rmdir()
        leftovers = [p for p in self.path.iterdir() if p.name != "manifest.json"]
        if not leftovers:
            (self.path / "manifest.json").unlink(missing_ok=True)
            self.path.rmdir()


def _fitted_files(fitted: FittedRecord) -> dict[str, bytes]:
    from clipfusion.fitted import DETECTOR_FILE

    return {name: (fitted.path / name).read_bytes() for name in [DETECTOR_FILE, *fitted.record["files"]]}


def _default_batch_size(config: Any) -> int:
    """What a local run uses when not told: the smallest of the branches' own batch sizes."""
    clip, diffusion = config.branch_configs()
    sizes = [c.batch_size for c, on in ((clip, config.use_clip), (diffusion, config.use_diffusion)) if on]
    return min(sizes) if sizes else 1


def _blocks(table: pa.Table, batch: int) -> list[pa.Table]:
    rows = batch * max(1, -(-table.num_rows // (batch * MAX_BLOCKS)))
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def _user_error(exc: BaseException) -> ClipfusionError | None:
    """The clipfusion error a worker raised (a weights mismatch, missing weights …), out of Ray's wrappers:
    the exception itself where Ray keeps it, else its last line in the text Ray made of it (an actor that
    dies in its constructor reaches the driver as text only)."""
    from clipfusion import errors

    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ClipfusionError):
            return current
        stack += [getattr(current, "cause", None), current.__cause__, current.__context__]
    found = re.findall(r"^clipfusion\.errors\.(\w+): (.+)$", str(exc), flags=re.MULTILINE)
    if found:
        name, message = found[-1]
        kind = getattr(errors, name, None)
        if isinstance(kind, type) and issubclass(kind, ClipfusionError):
            return ClipfusionError(message) if kind is errors.InputErrors else kind(message)
    return None


def _connect(ray: Any, address: str | None) -> bool:
    """Use the Ray instance this process already has, else join ``address`` (``auto``: the cluster started
    on this machine with ``ray start``), else start a private instance. True when this call started or
    joined one (and must shut it down)."""
    if ray.is_initialized():
        return False
    try:
        ray.init(
            address=address or "local",
            include_dashboard=False if not address else None,
            logging_level=logging.WARNING,
            log_to_driver=log.isEnabledFor(logging.DEBUG),
        )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"--address {address}: cannot connect to a Ray cluster ({exc})") from exc
    return True


def _check_resources(ray: Any, workers: int, cpus: float, gpus: float) -> None:
    total = ray.cluster_resources()
    if gpus > 0 and total.get("GPU", 0) < gpus:
        raise ConfigError(
            f"--gpus-per-worker {gpus:g}: the Ray cluster has {total.get('GPU', 0):g} GPUs; drop the option "
            "to run on CPUs"
        )
    if total.get("CPU", 0) < cpus:
        raise ConfigError(
            f"--cpus-per-worker {cpus:g}: the Ray cluster has {total.get('CPU', 0):g} CPUs in all"
        )
    if workers * max(cpus, 1e-9) > total.get("CPU", 0) or (gpus > 0 and workers * gpus > total.get("GPU", 0)):
        log.warning(
            "%d workers need more than the cluster's %g CPUs / %g GPUs: the rest start as resources free up",
            workers,
            total.get("CPU", 0),
            total.get("GPU", 0),
        )


class _DropNotices(logging.Filter):
    """Ray Data's notices about the bars and start-up prints this run switches off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Progress bars disabled" not in message and "execution finished in" not in message


_NOTICES = _DropNotices()
_NOISY = ("ray.data._internal.progress", "ray.data._internal.execution.streaming_executor")


def _quiet_ray_data(ray: Any) -> dict[str, Any]:
    """Our own progress bar and error records instead of Ray Data's bars and start-up prints; blocks whose
    worker died on every retry are dropped and listed, not fatal. Returns what to restore."""
    ctx = ray.data.DataContext.get_current()
    wanted = {"enable_progress_bars": False, "max_errored_blocks": -1, "print_on_execution_start": False}
    saved = {k: getattr(ctx, k) for k in wanted if hasattr(ctx, k)}
    for key in saved:
        setattr(ctx, key, wanted[key])
    for name in _NOISY:
        logging.getLogger(name).addFilter(_NOTICES)
    return saved


def _restore_ray_data(ray: Any, saved: dict[str, Any]) -> None:
    ctx = ray.data.DataContext.get_current()
    for key, value in saved.items():
        setattr(ctx, key, value)
    for name in _NOISY:
        logging.getLogger(name).removeFilter(_NOTICES)


def _execute(ds: Any, writer: rec.PartsWriter, bar: Any) -> int:
    """Run ``ds``, keeping its records; the number of images done (status ok)."""
    done = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(batch)
            done += int(pc.sum(pc.equal(batch.column("status"), OK)).as_py() or 0)
            bar.update(batch.num_rows)
    except ClipfusionError:
        raise
    except Exception as exc:
        user = _user_error(exc)
        if user is not None:
            raise type(user)(f"a Ray worker failed: {user}") from exc
        raise
    finally:
        writer.close()
        bar.close()
    return done


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

    payload = _fitted_files(record)
    run = {
        "fitted": hashlib.sha256(payload[fitted_mod.DETECTOR_FILE]).hexdigest(),
        "threshold": image_t,
        "pixel_threshold": pixel_t,
        "normalize": normalize,
    }
    folder = RunFolder(out, overwrite=overwrite, resume=resume)
    folder.check(run)
    table = with_output_names(resolve_inputs(inputs, exclude=[out]), masks=masks)
    batch = batch_size or _default_batch_size(config)

    ray = require_ray()
    connected = _connect(ray, address)
    saved_ctx: dict[str, Any] = {}
    try:
        _check_resources(ray, workers, cpus_per_worker, gpus_per_worker)
        saved_ctx = _quiet_ray_data(ray)
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
            blocks = _blocks(pending, batch)
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
                scored_now = _execute(
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
                ds = ray.data.from_arrow(_blocks(todo, max(batch, 16))).map_batches(
                    draw_overlays,
                    batch_size=None,
                    batch_format="pyarrow",
                    num_cpus=1,
                    fn_kwargs={"out": str(root), "vmin": vmin, "vmax": vmax, "png_text": png_text},
                )
                writer = rec.PartsWriter(root, rec.OVERLAYS, OVERLAY_SCHEMA)
                _execute(ds, writer, progress_bar(todo.num_rows, "overlays (ray)", enabled=progress))
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
        _write_report(
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
            _restore_ray_data(ray, saved_ctx)
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


def _write_report(
    root: Path,
    scored: pa.Table,
    *,
    top: int | None,
    threshold: float | None,
    title: str,
    banner: str,
    details: dict[str, str],
) -> None:
    """The report from the overlays on disk: thumbnails of the ``top`` highest scores only, a histogram of
    all of them."""
    from PIL import Image

    scores = scored.column("score").to_pylist()
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    shown = ranked if top is None else ranked[:top]
    paths, overlays = scored.column("path").to_pylist(), scored.column("overlay").to_pylist()
    entries = []
    for i in shown:
        said = decide(scores[i], threshold) if threshold is not None else None
        with Image.open(root / overlays[i]) as image:
            thumbnail = report.thumbnail_data_uri(image)
        entries.append(
            report.ReportEntry(
                name=paths[i],
                score=scores[i],
                thumbnail=thumbnail,
                overlay_href=overlays[i],
                decision=said,
            )
        )
    report.write_html(
        root / "report.html",
        report.html_report(
            entries,
            title=title,
            subtitle=f"{len(scores)} images, sorted by anomaly score (highest first)",
            banner=banner,
            details=details,
            top=top,
            scores=scores,
            threshold=threshold,
        ),
    )


__all__ = ["MAX_TASK_RETRIES", "RunFolder", "RunSummary", "predict", "require_ray"]
