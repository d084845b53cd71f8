"""What runs inside a Ray worker: a callable class that loads the fitted detector once per actor and scores
batches of paths, and the function of the second pass that draws overlays on a set-wide colour scale.

Both read images with :func:`clipfusion.data.load_image` (16-bit, CMYK, palette, EXIF rotation: the same
pixels as a local run) and write their outputs straight into the output folder, each file atomically
(:mod:`clipfusion.files`), so a worker killed mid-batch leaves no half-written file and the batch's
retry rewrites the same bytes. What comes back to the driver is one small record per image (status, score,
the map's range), never a map or an image.

An unreadable image becomes a ``skipped`` record and a model error on one image a ``failed`` record: data
never makes a task fail, so Ray's retries are kept for what they are for, workers that die.

Nothing here imports Ray at module level (an actor fetches the fitted folder from the object store when
given a reference): the classes are plain Python and are tested as such.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clipfusion.errors import one_line
from clipfusion.files import private_temp_dir
from clipfusion.thresholds import pixel_mask

#: the record of one image, as the workers return it (and the driver stores it for --resume)
RECORD_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("path", pa.string()),
        ("map", pa.string()),
        ("status", pa.string()),  # ok | skipped (unreadable input) | failed (model error)
        ("problem", pa.string()),
        ("score", pa.float64()),
        ("map_min", pa.float64()),
        ("map_max", pa.float64()),
        ("worker", pa.string()),
    ]
)
OVERLAY_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("path", pa.string()),
        ("overlay", pa.string()),
        ("vmin", pa.float64()),
        ("vmax", pa.float64()),
        ("status", pa.string()),
        ("problem", pa.string()),
        ("worker", pa.string()),
    ]
)
OK, SKIPPED, FAILED = "ok", "skipped", "failed"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _load(source: str) -> Any:
    """The image, or the one-line problem with it (missing, corrupt, too small, too large …)."""
    from clipfusion.data.images import MIN_SIDE, load_image
    from clipfusion.errors import InputError

    try:
        return load_image(source, min_side=MIN_SIDE)
    except InputError as exc:
        return str(exc)
    except Exception as exc:  # a worker never dies of an input file
        return f"{source}: {one_line(exc)}"


def _as_given(problem: str, row: dict[str, Any]) -> str:
    """A loader's ``"<source>: problem"`` line with the path as the user gave it (as a local run says it)."""
    source = row["source"]
    return row["path"] + problem[len(source) :] if problem.startswith(f"{source}: ") else problem


def _draw_overlay(
    image: Any, anomaly_map: np.ndarray, vmin: float, vmax: float, path: Path, text: dict
) -> None:
    from clipfusion.outputs import report

    report.save_png(report.overlay(image, report.normalise(anomaly_map, vmin, vmax)), path, text=text)


class ScoreBatch:
    """The per-actor model: built once (the fitted detector, from the bytes of its folder, checked by their
    sha256 as any ``CLIPFusion.load``), then called on batches of paths.

    ``fitted_files`` maps each file of the fitted folder to its bytes (or is ``[ref]``, a Ray object holding
    that mapping): the folder travels through Ray's object store, so it only has to exist on the machine
    that starts the run, and every worker is sure to use the same fit. The model weights come from
    ``weights_dir`` (or the Hugging Face cache) on each worker's machine, and are checked against the fit's
    fingerprint when the detector loads.

    Several fitted objects (a production line's mixed batch): ``fitted_files`` maps each object's name to
    its folder's files, the actor loads them all onto one copy of the models
    (:class:`~clipfusion.detector_set.DetectorSet`), each row's ``object`` says which scores it, and
    ``pixel_threshold`` maps names to their pixel thresholds.
    """

    def __init__(
        self,
        fitted_files: dict[str, Any] | list[Any],
        *,
        out: str,
        fitted_path: str | dict[str, str] = "the fitted detector",
        weights_dir: str | None = None,
        device: str | None = None,
        threads: int = 1,
        batch_size: int | None = None,
        pixel_threshold: float | dict[str, float | None] | None = None,
        overlays: bool = False,
        png_text: dict[str, Any] | None = None,
    ) -> None:
        import torch

        from clipfusion.detector import CLIPFusion
        from clipfusion.detector_set import DetectorSet
        from clipfusion.errors import ClipfusionError

        self.threads = max(1, int(threads))
        torch.set_num_threads(self.threads)
        if isinstance(fitted_files, list):  # [ObjectRef]: the driver put the folder in the object store once
            import ray

            fitted_files = ray.get(fitted_files[0])
        several = all(isinstance(files, dict) for files in fitted_files.values())
        folders = fitted_files if several else {"": fitted_files}
        shown = fitted_path if isinstance(fitted_path, dict) else {"": fitted_path}
        temporary = str(private_temp_dir("clipfusion-fitted-"))  # and the folders of killed workers go
        copies = {name: Path(temporary, name or "fitted") for name in folders}
        try:
            for name, files in folders.items():
                copies[name].mkdir()
                for file, payload in files.items():
                    (copies[name] / file).write_bytes(payload)
            if several:
                #: the detector of each object of a several-object run, on one copy of the models
                self.detectors: dict[str, Any] = dict(
                    DetectorSet.load(copies, weights_dir=weights_dir, device=device)
                )
                self.detector = next(iter(self.detectors.values()))
            else:
                self.detector = CLIPFusion.load(copies[""], weights_dir=weights_dir, device=device)
        except ClipfusionError as exc:  # named after the folder the user gave, not this copy
            message = str(exc)
            for name, copy in copies.items():
                message = message.replace(str(copy), shown.get(name, name))
            exc.args = (message,)
            raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        self.out = Path(out)
        self.batch_size = batch_size
        #: None (no masks), a value, or for several objects each object's (None where it has none)
        self.pixel_threshold = pixel_threshold
        self.overlays = overlays
        #: the PNG text chunks (for several objects, each object's)
        self.png_text = dict(png_text or {})
        self.name = worker_name()

    @property
    def _per_object_text(self) -> bool:
        return bool(self.png_text) and all(isinstance(v, dict) for v in self.png_text.values())

    def _predict(self, images: Sequence[Any], name: str = "") -> list[Any]:
        """Results for the images (all of the object ``name``) in one call, or, when that call fails, one by
        one: a failing image then costs only its own record."""
        detector = self.detectors[name] if name else self.detector
        try:
            return list(detector.predict(list(images), batch_size=self.batch_size))
        except Exception:
            if len(images) == 1:
                raise
        results: list[Any] = []
        for image in images:
            try:
                results.append(detector.predict([image], batch_size=1)[0])
            except Exception as exc:
                results.append(exc)
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        from clipfusion.outputs import report

        rows = batch.to_pylist()
        with ThreadPoolExecutor(min(self.threads, len(rows)) or 1) as pool:
            loaded = list(pool.map(_load, [row["source"] for row in rows]))
        good = [i for i, item in enumerate(loaded) if not isinstance(item, str)]
        results: dict[int, Any] = {}
        objects = [row.get("object") or "" for row in rows]
        for name in dict.fromkeys(objects[i] for i in good):  # a batch holds one object's rows
            mine = [i for i in good if objects[i] == name]
            try:
                found = self._predict([loaded[i] for i in mine], name)
            except Exception as exc:
                found = [exc] * len(mine)
            results.update(zip(mine, found, strict=True))
        records = []
        for i, row in enumerate(rows):
            record = {
                "index": row["index"],
                "path": row["path"],
                "map": row["map"],
                "status": OK,
                "problem": None,
                "score": None,
                "map_min": None,
                "map_max": None,
                "worker": self.name,
            }
            item = loaded[i]
            if isinstance(item, str):
                record.update(status=SKIPPED, problem=_as_given(item, row))
            elif isinstance(results[i], BaseException):
                record.update(status=FAILED, problem=f"{row['path']}: {one_line(results[i])}")
            else:
                result = results[i]
                anomaly_map = result.anomaly_map
                low, high = float(anomaly_map.min()), float(anomaly_map.max())
                try:
                    report.save_npy(anomaly_map, self.out / row["map"])
                    pixel_threshold = (
                        self.pixel_threshold.get(objects[i])
                        if isinstance(self.pixel_threshold, dict)
                        else self.pixel_threshold
                    )
                    text = self.png_text.get(objects[i], {}) if self._per_object_text else self.png_text
                    if pixel_threshold is not None:
                        mask = report.mask_image(pixel_mask(anomaly_map, pixel_threshold), item.size)
                        report.save_png(mask, self.out / row["mask"], text=text)
                    if self.overlays:
                        _draw_overlay(item, anomaly_map, low, high, self.out / row["overlay"], text)
                except OSError as exc:  # a full or read-only output disk: said per image, not a dead task
                    record.update(status=FAILED, problem=f"{row['path']}: cannot write its outputs ({exc})")
                else:
                    record.update(score=float(result.score), map_min=low, map_max=high)
            records.append(record)
        return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def draw_overlays(
    batch: pa.Table, *, out: str, vmin: float, vmax: float, png_text: dict[str, str]
) -> pa.Table:
    """Second pass (``normalize="set"``): every overlay on the colour scale of the whole set, from the stored
    map and the image — what a local run does once all maps exist. Cheap next to scoring (no model)."""
    root = Path(out)
    name = worker_name()
    records = []
    for row in batch.to_pylist():
        record = {
            "index": row["index"],
            "path": row["path"],
            "overlay": row["overlay"],
            "vmin": vmin,
            "vmax": vmax,
            "status": OK,
            "problem": None,
            "worker": name,
        }
        image = _load(row["source"])
        if isinstance(image, str):
            record.update(status=FAILED, problem=_as_given(image, row))
        else:
            try:
                anomaly_map = np.load(root / row["map"])
                _draw_overlay(image, anomaly_map, vmin, vmax, root / row["overlay"], png_text)
            except Exception as exc:
                record.update(status=FAILED, problem=f"{row['path']}: overlay: {one_line(exc)}")
        records.append(record)
    return pa.Table.from_pylist(records, schema=OVERLAY_SCHEMA)


__all__ = ["FAILED", "OK", "OVERLAY_SCHEMA", "RECORD_SCHEMA", "SKIPPED", "ScoreBatch", "draw_overlays"]
