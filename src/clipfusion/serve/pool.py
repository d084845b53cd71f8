"""The fitted detectors a server holds: checked at start, loaded in the background, one worker each, all on
one copy of the models.

A server must answer ``/healthz`` at once (a supervisor restarting a process that takes a minute to load its
models would never see it come up) and say ``/readyz`` only when every model is loaded, so loading runs in a
thread of its own after the server starts listening. The folders are checked with
:func:`clipfusion.fitted.read` before that (no model is loaded for it), so a wrong ``--fitted`` fails the
command with one line, not a server that never becomes ready.

The networks are loaded once for every detector that can share them (:mod:`clipfusion.shared`): fifteen
products cost one copy of the models and fifteen fitted states of a few MB, not fifteen copies. A fitted
folder that needs other networks (another dtype, other weights or architecture) is served on a second set of
models, loaded the same way; one whose weights are not the shared models' fails to load with one line.
Each detector keeps its own queue and micro-batching worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipfusion.config import check_batch_size
from clipfusion.errors import ClipfusionError, ConfigError
from clipfusion.fitted import NAME_PATTERN, parse_fitted
from clipfusion.serve.batching import Gate, MicroBatcher

if TYPE_CHECKING:
    from PIL import Image

    from clipfusion.detector import AnomalyResult, CLIPFusion
    from clipfusion.fitted import FittedRecord

log = logging.getLogger(__name__)

WAITING, LOADING, READY, FAILED = "waiting", "loading", "ready", "failed"


@dataclass(frozen=True)
class Limits:
    """How each detector's worker batches and how much work it lets in (see :mod:`batching`)."""

    batch_size: int | None = None  # None: the detector's own default
    max_wait_ms: float = 10.0
    max_queue: int = 32

    def __post_init__(self) -> None:
        check_batch_size(self.batch_size, "--batch-size")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"--max-wait-ms must lie in [0, 10000], got {self.max_wait_ms}")
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue must be at least 1, got {self.max_queue}")


@dataclass
class Slot:
    """One served detector: its folder, the door (:class:`Gate`), and once loaded its model and worker."""

    name: str
    record: FittedRecord
    gate: Gate
    state: str = WAITING
    error: str | None = None
    detector: CLIPFusion | None = None
    batcher: MicroBatcher[Image.Image, AnomalyResult] | None = None
    load_seconds: float | None = None
    #: the detectors whose models this one's are (itself included), once its set of models is planned
    shares_models_with: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return self.state == READY


Loader = Callable[["FittedRecord"], "CLIPFusion"]


class DetectorPool:
    """The detectors of one server, by name, on shared models (:mod:`clipfusion.shared`). ``loader`` turns a
    checked folder into a detector instead (tests pass their own to hold loading back)."""

    def __init__(
        self,
        fitted: dict[str, str | Path],
        limits: Limits | None = None,
        *,
        loader: Loader | None = None,
        weights_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        device: str | None = None,
    ) -> None:
        from clipfusion.fitted import read

        self.limits = limits or Limits()
        self.slots: dict[str, Slot] = {}
        for name, path in fitted.items():
            if not NAME_PATTERN.match(name):
                raise ConfigError(f"{name!r} is not a usable detector name (letters, digits, '.', '_', '-')")
            # quick: hashes and parses the folder, loads no model
            self.slots[name] = Slot(name, read(path), Gate(self.limits.max_queue))
        self._weights_dir = weights_dir
        self._local_files_only = local_files_only
        self._device = device
        self._loader = loader
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def _plan(self) -> list[tuple[Callable[[], Any], list[str]]]:
        """``[(load the models, names)]``: one set of models for every group of detectors that can share
        them (with a custom loader, each detector alone)."""
        if self._loader is not None:
            return [(lambda: None, [name]) for name in self.slots]
        from clipfusion.shared import SharedModels, plan_models

        configs = {
            name: slot.record.config
            if self._device is None
            else slot.record.config.replace(device=self._device)
            for name, slot in self.slots.items()
        }
        plans = []
        for config, names in plan_models(configs):

            def build(config: Any = config) -> SharedModels:
                return SharedModels(
                    config,
                    weights_dir=self._weights_dir,
                    local_files_only=self._local_files_only,
                    text_encoders=False,
                )

            plans.append((build, names))
        return plans

    def _load(self, slot: Slot, models: Any) -> CLIPFusion:
        if self._loader is not None:
            return self._loader(slot.record)
        from clipfusion.detector import CLIPFusion

        return CLIPFusion.load(
            slot.record.path, local_files_only=self._local_files_only, device=self._device, models=models
        )

    # -- loading ------------------------------------------------------------------------------------------
    def start(self, on_failure: Callable[[str, str], None] | None = None) -> None:
        """Load every detector in a background thread (once); ``on_failure(name, message)`` is called when
        one cannot be loaded."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self.load_all, args=(on_failure,), name="clipfusion-loader", daemon=True
        )
        self._thread.start()

    def load_all(self, on_failure: Callable[[str, str], None] | None = None) -> None:
        def failed(slot: Slot, exc: Exception) -> None:  # one line; the server says so on /readyz
            slot.state = FAILED
            slot.error = str(exc) if isinstance(exc, ClipfusionError) else f"{type(exc).__name__}: {exc}"
            log.error(f"detector {slot.name!r} could not be loaded: {slot.error}")
            if on_failure is not None:
                on_failure(slot.name, slot.error)

        try:
            plans = self._plan()
        except Exception as exc:  # a placement that cannot be resolved, say: every detector says so
            for slot in self.slots.values():
                failed(slot, exc)
            return
        for build, names in plans:
            group = [self.slots[name] for name in names]
            start = time.perf_counter()
            for slot in group:
                slot.state = LOADING
                slot.shares_models_with = tuple(names) if self._loader is None else ()
            if self._loader is None:
                log.info(f"loading the models for {len(names)} detector(s): {', '.join(names)}")
            try:
                models = build()
            except Exception as exc:
                for slot in group:
                    failed(slot, exc)
                continue
            for slot in group:
                if self._closed.is_set():
                    return
                log.info(f"loading detector {slot.name!r} from {slot.record.path}")
                try:
                    detector = self._load(slot, models)
                except Exception as exc:
                    failed(slot, exc)
                    continue
                self._ready(slot, detector, time.perf_counter() - start)

    def _ready(self, slot: Slot, detector: CLIPFusion, seconds: float) -> None:
        batch_size = self.limits.batch_size or detector.default_batch_size
        slot.detector = detector
        slot.batcher = MicroBatcher(
            _scorer(detector),
            batch_size=batch_size,
            max_wait_s=self.limits.max_wait_ms / 1000.0,
            name=slot.name,
        )
        slot.load_seconds = seconds
        slot.state = READY
        log.info(
            f"detector {slot.name!r} ready in {slot.load_seconds:.1f} s ({detector.object_name!r}, "
            f"{detector.shots}-shot, batches of up to {batch_size})"
        )
        if self._closed.is_set():  # closed while this one loaded
            slot.batcher.close()

    @property
    def ready(self) -> bool:
        return all(slot.ready for slot in self.slots.values())

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every detector is loaded or one failed (for scripts and tests); True when ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready:
            if any(s.state == FAILED for s in self.slots.values()):
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop every worker after it finished what it holds."""
        self._closed.set()
        for slot in self.slots.values():
            if slot.batcher is not None:
                slot.batcher.close(timeout)


def _scorer(detector: CLIPFusion) -> Callable[[list[Image.Image]], list[AnomalyResult]]:
    def score(images: list[Image.Image]) -> list[AnomalyResult]:
        # the whole micro-batch in one forward pass (predict halves it by itself on out-of-memory)
        return detector.predict(images, batch_size=len(images))

    return score


__all__ = ["FAILED", "LOADING", "READY", "WAITING", "DetectorPool", "Limits", "Slot", "parse_fitted"]
