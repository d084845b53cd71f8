"""Scoring a list of image files and writing everything a user looks at: ``scores.csv``, the raw maps
(``maps/*.npy``), heat-map overlays (``overlays/*.png``), masks when a pixel threshold is known
(``masks/*.png``), the configuration (``config.json``), the thresholds (``thresholds.json``) when known,
``report.html``, and ``manifest.json`` listing all of them.

Every row of ``scores.csv`` names the files written for its image (``overlay``, ``map``, ``mask`` columns,
relative to the folder), so outputs stay matched to inputs when file names collide, and a ``weights`` column
says whether the scores come from the pretrained models or from random weights (a pipeline demonstration).
Memory stays bounded whatever the number of images: maps are written batch by batch and read back for the
overlays, whose shared colour scale is only known once every map exists.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipfusion.files import atomic_write_text
from clipfusion.outputs import report
from clipfusion.outputs.folders import LOCAL_RECORDS, OutputFolder
from clipfusion.progress import progress_bar
from clipfusion.provenance import WEIGHTS_NOTE, weights_kind
from clipfusion.thresholds import decide, pixel_mask

if TYPE_CHECKING:
    from clipfusion.detector import CLIPFusion
    from clipfusion.thresholds import Thresholds

log = logging.getLogger(__name__)


def mirrored_stems(sources: Sequence[str]) -> list[str]:
    """Output names for absolute, normalised input paths: each path relative to the deepest folder that
    holds them all, without its suffix — ``test/good/000.png`` and ``test/hole/000.png`` become
    ``good/000`` and ``hole/000``, so an output says which input it shows (inputs of one folder keep their
    bare stems). Names that would still collide (``x.png`` and ``x.jpg`` in one folder) keep their suffix
    (``x.png``, ``x.jpg``); only a file given twice gets ``_2``.

    One function for both engines (a Ray run names a million outputs with it): the common folder is that
    of the smallest and the largest path, the rest is string slicing.
    """
    if not sources:
        return []
    # character by character on purpose: cut at the last "/" of what every path shares
    common = os.path.commonprefix([min(sources), max(sources)])  # noqa: RUF071
    cut = common.rfind("/") + 1
    rels = [s[cut:] for s in sources]
    stems = [_without_suffix(r) for r in rels]
    # a stem shared by different files (x.png, x.jpg) keeps the suffixes; a file given twice does not
    files_per_stem = Counter(stem for stem, _ in dict.fromkeys(zip(stems, rels, strict=True)))
    wanted = [rel if files_per_stem[stem] > 1 else stem for rel, stem in zip(rels, stems, strict=True)]
    used: set[str] = set()
    # where the search for a free ``name_k`` resumes: names are never freed, so every smaller k is taken
    resume_at: dict[str, int] = {}
    out = []
    for name in wanted:
        count = resume_at.get(name, 1)
        chosen = name if count == 1 else f"{name}_{count}"
        while chosen in used:
            count += 1
            chosen = f"{name}_{count}"
        used.add(chosen)
        resume_at[name] = count + 1
        out.append(chosen)
    return out


def _without_suffix(rel: str) -> str:
    """``a/b/x.png`` → ``a/b/x`` (as :attr:`pathlib.Path.stem` cuts the last part: ``.x`` keeps its dot)."""
    dot = rel.rfind(".")
    return rel[:dot] if dot > rel.rfind("/") + 1 else rel


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output names per input image (:func:`mirrored_stems` of their absolute paths)."""
    return mirrored_stems([os.path.abspath(p) for p in paths])


@dataclass(frozen=True)
class OutputNames:
    """The files written for one input image, relative to the output folder."""

    overlay: str
    map: str
    mask: str | None


def output_names(files: Sequence[Path], with_masks: bool) -> list[OutputNames]:
    return [
        OutputNames(f"overlays/{n}.png", f"maps/{n}.npy", f"masks/{n}.png" if with_masks else None)
        for n in unique_stems(files)
    ]


def planned_files(names: Sequence[OutputNames], *, thresholds: bool) -> list[str]:
    """Every file a prediction run writes (what its manifest lists before the first one exists)."""
    fixed = ["scores.csv", "config.json", "report.html"] + (["thresholds.json"] if thresholds else [])
    per_image = [f for n in names for f in (n.overlay, n.map, n.mask) if f is not None]
    return fixed + per_image


def write_skipped_csv(path: Path, skipped: Sequence[tuple[str, str]]) -> None:
    """``path,problem``: the inputs a run left out (unreadable with ``--skip-bad``), one line each."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "problem"])
    writer.writerows(skipped)
    atomic_write_text(path, buf.getvalue())


def run_settings(
    detector: CLIPFusion,
    threshold: float | None,
    pixel_threshold: float | None,
    normalize: str,
    batch_size: int,
) -> dict[str, Any]:
    """What decides a prediction run's outputs, as its manifest records it: ``--resume`` continues only a
    run of the same fit (configuration, object, references), thresholds, normalisation and batch size."""
    from clipfusion.thresholds import reference_names

    fit = {
        "config": detector.config.to_dict(),
        "object": detector.object_name,
        "references": list(reference_names(detector.references)),
    }
    return {
        "fit": hashlib.sha256(json.dumps(fit, sort_keys=True, default=str).encode()).hexdigest(),
        "threshold": threshold,
        "pixel_threshold": pixel_threshold,
        "normalize": normalize,
        "batch_size": batch_size,
    }


def read_records(
    root: Path, wanted: set[tuple[str, str]]
) -> dict[tuple[str, str], tuple[float, float, float]]:
    """The scored images of an earlier, interrupted run in ``root``: ``(path, map) → (score, map min, map
    max)`` for each of ``wanted`` whose record and map file exist (the newest record wins; a last line cut
    short by the interruption is ignored)."""
    found: dict[tuple[str, str], tuple[float, float, float]] = {}
    try:
        text = (root / LOCAL_RECORDS).read_text(encoding="utf-8")
    except FileNotFoundError:
        return found
    for line in text.splitlines():
        try:
            r = json.loads(line)
            key, value = (
                (str(r["path"]), str(r["map"])),
                (float(r["score"]), float(r["min"]), float(r["max"])),
            )
        except (ValueError, KeyError, TypeError):
            continue
        if key in wanted:
            found[key] = value
    return {k: v for k, v in found.items() if (root / k[1]).is_file()}


def write_predictions(
    detector: CLIPFusion,
    files: Sequence[Path],
    out: Path | OutputFolder,
    *,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    thresholds: Thresholds | None = None,
    normalize: str = "set",
    batch_size: int | None = None,
    progress: bool = True,
    title: str = "clipfusion",
    banner: str = "",
    details: dict[str, str] | None = None,
    labels: Sequence[str] | None = None,
    report_top: int | None = report.REPORT_TOP,
    skipped: Sequence[tuple[str, str]] = (),
) -> list[tuple[str, float, str]]:
    """Predict ``files`` with a fitted detector and write the outputs; returns (path, score, decision).

    ``out`` is an :class:`OutputFolder` (checked and claimed through its manifest) or a path to a new or
    empty folder. ``thresholds``, when given, is written to ``thresholds.json`` beside the scores. The
    report shows the ``report_top`` highest scores (None: every image) and a histogram of all of them.
    ``skipped`` (path, problem) pairs, the inputs left out as unreadable, go to ``skipped.csv``.

    Each batch's scores are appended to a records file as soon as its maps are written, so an interrupted
    run keeps what it scored: an :class:`OutputFolder` opened with ``resume`` rescores only the batches
    with an image missing (whole batches, so every image is scored beside the same neighbours as in an
    uninterrupted run) and then writes the files an uninterrupted run writes.
    """
    from clipfusion.data import load_image

    if normalize not in report.NORMALISATIONS:
        raise ValueError(f"normalize must be one of {report.NORMALISATIONS}")
    folder = out if isinstance(out, OutputFolder) else OutputFolder(out)
    weights = weights_kind(detector.config)
    names = output_names(files, with_masks=pixel_threshold is not None)
    batch = batch_size or detector.default_batch_size
    folder.open(
        planned_files(names, thresholds=thresholds is not None)
        + [LOCAL_RECORDS]
        + (["skipped.csv"] if skipped else []),
        run=run_settings(detector, threshold, pixel_threshold, normalize, batch),
        engine="local",
        command="predict",
        images=len(files),
        weights=weights,
        weights_note=WEIGHTS_NOTE[weights],
    )
    root = folder.path
    png_text = {"clipfusion-weights": WEIGHTS_NOTE[weights]}
    keys = [(str(path), name.map) for path, name in zip(files, names, strict=True)]
    done = read_records(root, set(keys)) if folder.resumed else {}
    starts = [s for s in range(0, len(files), batch) if any(k not in done for k in keys[s : s + batch])]
    todo = sum(min(batch, len(files) - s) for s in starts)
    if folder.resumed:
        log.info(f"resuming: {len(files) - todo} of {len(files)} images already scored")
    if todo:
        log.info(f"scoring {todo} images")
    bar = progress_bar(todo, "predict", enabled=progress and todo > 0)
    (root / LOCAL_RECORDS).parent.mkdir(parents=True, exist_ok=True)
    with (root / LOCAL_RECORDS).open("a", encoding="utf-8") as records:
        for start in starts:
            chunk = list(files[start : start + batch])
            results = detector.predict(chunk, batch_size=batch)
            lines = []
            for key, name, result in zip(
                keys[start : start + batch], names[start : start + batch], results, strict=True
            ):
                report.save_npy(result.anomaly_map, root / name.map)
                done[key] = (result.score, float(result.anomaly_map.min()), float(result.anomaly_map.max()))
                score, low, high = done[key]
                record = {"path": key[0], "map": key[1], "score": score, "min": low, "max": high}
                lines.append(json.dumps(record) + "\n")
            # after the maps: a record names only files that exist
            records.write("".join(lines))
            records.flush()
            bar.update(len(chunk))
    bar.close()
    rows: list[tuple[str, float, str]] = []
    for key in keys:
        score = done[key][0]
        rows.append((key[0], score, decide(score, threshold) if threshold is not None else ""))
    vmin = min((done[k][1] for k in keys), default=0.0)
    vmax = max((done[k][2] for k in keys), default=0.0)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    with_masks = pixel_threshold is not None
    header = ["path", "score"] + (["decision"] if threshold is not None else []) + ["overlay", "map"]
    writer.writerow(header + (["mask"] if with_masks else []) + ["weights"])
    for (path, score, decision), name in zip(rows, names, strict=True):
        row = (
            [path, f"{score:.6f}"] + ([decision] if threshold is not None else []) + [name.overlay, name.map]
        )
        writer.writerow(row + ([name.mask] if with_masks else []) + [weights])
    atomic_write_text(root / "scores.csv", buf.getvalue())
    if skipped:
        write_skipped_csv(root / "skipped.csv", skipped)
    detector.save_config(root / "config.json")
    if thresholds is not None:
        thresholds.save(root / "thresholds.json")

    log.info("writing overlays" + (", masks" if with_masks else "") + " and the report")
    entries = []
    ranked = sorted(range(len(rows)), key=lambda i: -rows[i][1])
    in_report = set(ranked if report_top is None else ranked[:report_top])
    bar = progress_bar(len(rows), "overlays", enabled=progress)
    for index, ((path, score, decision), name) in enumerate(zip(rows, names, strict=True)):
        anomaly_map = np.load(root / name.map)
        if normalize == "image":
            heat = report.normalise(anomaly_map, float(anomaly_map.min()), float(anomaly_map.max()))
        else:
            heat = report.normalise(anomaly_map, vmin, vmax)
        image = load_image(path)
        over = report.overlay(image, heat)
        report.save_png(over, root / name.overlay, text=png_text)
        if name.mask is not None:
            mask = report.mask_image(pixel_mask(anomaly_map, pixel_threshold), image.size)
            report.save_png(mask, root / name.mask, text=png_text)
        bar.update(1)
        if index not in in_report:
            continue
        entries.append(
            report.ReportEntry(
                name=str(path),
                score=score,
                thumbnail=report.thumbnail_data_uri(over),
                overlay_href=name.overlay,
                decision=decision or None,
                label=labels[index] if labels else None,
            )
        )
    bar.close()
    details = dict(details or {})
    details["weights"] = WEIGHTS_NOTE[weights]
    details["normalisation"] = normalize
    if threshold is not None:
        details["threshold"] = f"{threshold:.6f}"
    if pixel_threshold is not None:
        details["pixel threshold"] = f"{pixel_threshold:.6f}"
    report.write_html(
        root / "report.html",
        report.html_report(
            entries,
            title=title,
            subtitle=f"{len(rows)} images, sorted by anomaly score (highest first)",
            banner=banner,
            details=details,
            top=report_top,
            scores=[score for _, score, _ in rows],
            threshold=threshold,
        ),
    )
    folder.close()
    return rows


def write_line_predictions(
    detectors: Mapping[str, CLIPFusion],
    routed: Sequence[tuple[Path, str]],
    out: OutputFolder,
    *,
    details: Mapping[str, dict[str, str]],
    banners: Mapping[str, str],
    normalize: str = "set",
    batch_size: int | None = None,
    progress: bool = True,
    report_top: int | None = report.REPORT_TOP,
    skipped: Sequence[tuple[str, str, str]] = (),
) -> list[tuple[str, str, float, str]]:
    """A mixed batch of several fitted objects (``routed``: each input with its object's name): one
    sub-folder per object, ``OUT/<name>/``, holding exactly what :func:`write_predictions` writes for that
    object's inputs alone (its own scores, maps, overlays, masks and thresholds from its fit, report), and
    across them ``OUT/scores.csv`` (every row with its ``object``, files relative to ``OUT``),
    ``OUT/report.html`` (one line per object, linking its report) and ``OUT/skipped.csv``; ``skipped`` is
    ``(path, object, problem)`` per input left out. ``details`` and ``banners`` are each object's report
    lines and warning (the page of the whole run shows every distinct warning). Returns ``(path, object,
    score, decision)`` in input order within each object."""
    names = list(dict.fromkeys(name for _, name in routed))
    files = {name: [path for path, of in routed if of == name] for name in names}
    kinds = {name: weights_kind(detectors[name].config) for name in names}
    weights = "random" if "random" in kinds.values() else "pretrained"
    planned = ["scores.csv", "report.html"] + (["skipped.csv"] if skipped else [])
    outputs: dict[str, list[OutputNames]] = {}
    for name in names:
        thresholds = detectors[name].thresholds
        outputs[name] = output_names(files[name], with_masks=thresholds is not None)
        per_object = planned_files(outputs[name], thresholds=thresholds is not None)
        left_out = [(path, problem) for path, of, problem in skipped if of == name]
        per_object += ["manifest.json", LOCAL_RECORDS] + (["skipped.csv"] if left_out else [])
        planned += [f"{name}/{file}" for file in per_object]
    out.open(planned, command="predict", images=len(routed), objects=names, weights=weights)
    rows: list[tuple[str, str, float, str]] = []
    lines: list[list[str]] = []
    summary = []
    for name in names:
        detector, thresholds = detectors[name], detectors[name].thresholds
        log.info(f"{name}: {len(files[name])} images")
        done = write_predictions(
            detector,
            files[name],
            OutputFolder(out.path / name),
            threshold=thresholds.image if thresholds is not None else None,
            pixel_threshold=thresholds.pixel if thresholds is not None else None,
            thresholds=thresholds,
            normalize=normalize,
            batch_size=batch_size,
            progress=progress,
            title=f"clipfusion: {detector.object_name}",
            banner=banners.get(name, ""),
            details=dict(details.get(name, {})),
            report_top=report_top,
            skipped=[(path, problem) for path, of, problem in skipped if of == name],
        )
        for (path, score, said), files_of in zip(done, outputs[name], strict=True):
            rows.append((path, name, score, said))
            mask = f"{name}/{files_of.mask}" if files_of.mask else ""
            overlay, map_file = f"{name}/{files_of.overlay}", f"{name}/{files_of.map}"
            lines.append([path, name, f"{score:.6f}", said, overlay, map_file, mask, kinds[name]])
        scores = [score for _, score, _ in done]
        summary.append(
            {
                "name": name,
                "object": str(detector.object_name),
                "images": len(done),
                "anomalous": sum(1 for *_, said in done if said == "anomalous") if thresholds else None,
                "top": max(scores) if scores else None,
                "report": f"{name}/report.html",
                "weights": WEIGHTS_NOTE[kinds[name]],
            }
        )
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "object", "score", "decision", "overlay", "map", "mask", "weights"])
    writer.writerows(lines)
    atomic_write_text(out.path / "scores.csv", buf.getvalue())
    if skipped:
        write_skipped_csv(out.path / "skipped.csv", [(path, problem) for path, _, problem in skipped])
    warning = " ".join(dict.fromkeys(b for b in banners.values() if b))
    report.write_html(out.path / "report.html", report.line_report(summary, banner=warning))
    out.close()
    return rows
