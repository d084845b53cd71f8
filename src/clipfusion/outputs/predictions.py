"""Scoring a list of image files and writing everything a user looks at: ``scores.csv``, the raw maps
(``maps/*.npy``), heat-map overlays (``overlays/*.png``), masks when a pixel threshold is known
(``masks/*.png``), the configuration (``config.json``) and ``report.html``.

Memory stays bounded whatever the number of images: maps are written batch by batch and read back for the
overlays, whose shared colour scale is only known once every map exists.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipfusion.outputs import report
from clipfusion.outputs.files import atomic_write_text
from clipfusion.progress import progress_bar

if TYPE_CHECKING:
    from clipfusion.detector import CLIPFusion


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output names per input image: the file stem, made unique when two inputs share one."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = path.stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(stem if count == 0 else f"{stem}_{count + 1}")
    return names


def write_predictions(
    detector: CLIPFusion,
    files: Sequence[Path],
    out: Path,
    *,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    normalize: str = "set",
    batch_size: int | None = None,
    progress: bool = True,
    title: str = "clipfusion",
    banner: str = "",
    details: dict[str, str] | None = None,
    labels: Sequence[str] | None = None,
) -> list[tuple[str, float, str]]:
    """Predict ``files`` with a fitted detector and write the outputs; returns (path, score, decision)."""
    from clipfusion.data import load_image

    if normalize not in report.NORMALISATIONS:
        raise ValueError(f"normalize must be one of {report.NORMALISATIONS}")
    out.mkdir(parents=True, exist_ok=True)
    names = unique_stems(files)
    maps_dir, overlay_dir, mask_dir = out / "maps", out / "overlays", out / "masks"
    rows: list[tuple[str, float, str]] = []
    vmin, vmax = float("inf"), float("-inf")
    batch = batch_size or detector.default_batch_size
    bar = progress_bar(len(files), "predict", enabled=progress)
    for start in range(0, len(files), batch):
        chunk = list(files[start : start + batch])
        results = detector.predict(chunk, batch_size=batch)
        for path, name, result in zip(chunk, names[start : start + batch], results, strict=True):
            report.save_npy(result.anomaly_map, maps_dir / f"{name}.npy")
            vmin = min(vmin, float(result.anomaly_map.min()))
            vmax = max(vmax, float(result.anomaly_map.max()))
            decision = ""
            if threshold is not None:
                decision = "anomalous" if result.score > threshold else "normal"
            rows.append((str(path), result.score, decision))
        bar.update(len(chunk))
    bar.close()

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["path", "score"] + (["decision"] if threshold is not None else [])
    writer.writerow(header)
    for path, score, decision in rows:
        writer.writerow([path, f"{score:.6f}"] + ([decision] if threshold is not None else []))
    atomic_write_text(out / "scores.csv", buf.getvalue())
    detector.save_config(out / "config.json")

    entries = []
    for index, ((path, score, decision), name) in enumerate(zip(rows, names, strict=True)):
        anomaly_map = np.load(maps_dir / f"{name}.npy")
        if normalize == "image":
            heat = report.normalise(anomaly_map, float(anomaly_map.min()), float(anomaly_map.max()))
        else:
            heat = report.normalise(anomaly_map, vmin, vmax)
        image = load_image(path)
        over = report.overlay(image, heat)
        report.save_png(over, overlay_dir / f"{name}.png")
        if pixel_threshold is not None:
            report.save_png(
                report.mask_image(anomaly_map > pixel_threshold, image.size), mask_dir / f"{name}.png"
            )
        entries.append(
            report.ReportEntry(
                name=str(path),
                score=score,
                thumbnail=report.thumbnail_data_uri(over),
                overlay_href=f"overlays/{name}.png",
                decision=decision or None,
                label=labels[index] if labels else None,
            )
        )
    details = dict(details or {})
    details["normalisation"] = normalize
    if threshold is not None:
        details["threshold"] = f"{threshold:.6f}"
    if pixel_threshold is not None:
        details["pixel threshold"] = f"{pixel_threshold:.6f}"
    report.write_html(
        out / "report.html",
        report.html_report(
            entries,
            title=title,
            subtitle=f"{len(entries)} images, sorted by anomaly score (highest first)",
            banner=banner,
            details=details,
        ),
    )
    return rows
