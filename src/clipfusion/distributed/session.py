"""What every distributed run does with Ray and its output folder: connect to (or start) Ray, check its
resources, keep Ray Data quiet, run a dataset while keeping its records, cut the inputs into blocks, claim
the output folder (:class:`RunFolder`) and write the report. The drivers are :mod:`.run` (one fitted object)
and :mod:`.line` (several on one copy of the models)."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from clipfusion.distributed import records as rec
from clipfusion.distributed.worker import OK
from clipfusion.errors import ClipfusionError, ConfigError, InputError
from clipfusion.outputs import report
from clipfusion.outputs.folders import OutputFolder, read_manifest
from clipfusion.thresholds import decide

if TYPE_CHECKING:
    from clipfusion.fitted import FittedRecord

log = logging.getLogger("clipfusion.distributed.run")

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


def canonical(value: Any) -> Any:
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
            before, now = earlier.get("run") or {}, canonical(run)
            differing = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            if differing:
                raise InputError(
                    f"{self.path}: the earlier run used another {', '.join(differing)}; --resume continues "
                    "the same run (use --overwrite to start again)"
                )

    def open_run(
        self,
        run: dict[str, Any],
        files: Sequence[str],
        *,
        patterns: Sequence[str] = PATTERNS,
        **details: Any,
    ) -> bool:
        """Claim the folder (True: an earlier run of the same settings is continued); ``patterns`` name the
        per-image files (removed with the run by ``--overwrite``)."""
        earlier = self._earlier()
        if earlier is None:
            self.created = not self.path.exists()
            self.open(files, engine="ray", run=canonical(run), patterns=list(patterns), **details)
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


def fitted_files(fitted: FittedRecord) -> dict[str, bytes]:
    from clipfusion.fitted import DETECTOR_FILE

    return {name: (fitted.path / name).read_bytes() for name in [DETECTOR_FILE, *fitted.record["files"]]}


def default_batch_size(config: Any) -> int:
    """What a local run uses when not told: the smallest of the branches' own batch sizes."""
    clip, diffusion = config.branch_configs()
    sizes = [c.batch_size for c, on in ((clip, config.use_clip), (diffusion, config.use_diffusion)) if on]
    return min(sizes) if sizes else 1


def cut_blocks(table: pa.Table, batch: int) -> list[pa.Table]:
    rows = batch * max(1, -(-table.num_rows // (batch * MAX_BLOCKS)))
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def user_error(exc: BaseException) -> ClipfusionError | None:
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


def connect(ray: Any, address: str | None) -> bool:
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


def check_resources(ray: Any, workers: int, cpus: float, gpus: float) -> None:
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


def quiet_ray_data(ray: Any) -> dict[str, Any]:
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


def restore_ray_data(ray: Any, saved: dict[str, Any]) -> None:
    ctx = ray.data.DataContext.get_current()
    for key, value in saved.items():
        setattr(ctx, key, value)
    for name in _NOISY:
        logging.getLogger(name).removeFilter(_NOTICES)


def execute(ds: Any, writer: rec.PartsWriter, bar: Any) -> int:
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
        user = user_error(exc)
        if user is not None:
            raise type(user)(f"a Ray worker failed: {user}") from exc
        raise
    finally:
        writer.close()
        bar.close()
    return done


def write_report(
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


__all__ = [
    "ACTOR_PREFIX",
    "MAX_BLOCKS",
    "MAX_TASK_RETRIES",
    "PATTERNS",
    "RunFolder",
    "RunSummary",
    "canonical",
    "check_resources",
    "connect",
    "cut_blocks",
    "default_batch_size",
    "execute",
    "fitted_files",
    "quiet_ray_data",
    "require_ray",
    "restore_ray_data",
    "user_error",
    "write_report",
]
