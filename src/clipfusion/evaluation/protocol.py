"""The benchmark protocol: per category, shot count and seed, draw references, predict the whole test
split, compute image and pixel metrics, and save results as soon as each run finishes.

Outputs in ``out_dir``: ``results.csv`` (one row per category, shots and seed; metrics as fractions),
``results.json`` (the same plus configuration, reference files, timings and software versions) and
``summary.md`` (per-category tables, mean ± std over seeds, in percent).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipfusion.config import CLIPFusionConfig
from clipfusion.data.datasets import dataset_categories, open_split
from clipfusion.errors import ConfigError
from clipfusion.evaluation.results import METRIC_COLUMNS, ResultStore, RunKey, software_versions


def weights_label(config: CLIPFusionConfig) -> dict[str, str]:
    """What results.json says about the weights: metrics of random weights measure the pipeline only."""
    if config.random_weights:
        note = "random weights: a pipeline demonstration; these metrics say nothing about detection quality"
        return {"kind": "random", "note": note}
    return {"kind": "pretrained", "note": "pretrained weights"}


def run_plan(categories: Sequence[str], shots: Sequence[int], seeds: Sequence[int]) -> list[RunKey]:
    """Zero-shot needs no references, so it runs once per category (with the first seed)."""
    if any(k < 0 for k in shots):
        raise ConfigError(f"shot counts must be >= 0, got {list(shots)}")
    if not seeds:
        raise ConfigError("at least one seed is needed")
    plan = []
    for category in categories:
        for k in dict.fromkeys(shots):
            for seed in [seeds[0]] if k == 0 else list(dict.fromkeys(seeds)):
                plan.append(RunKey(category, k, seed))
    return plan


def check_dataset(
    kind: str,
    root: str | Path,
    categories: Sequence[str],
    shots: Sequence[int],
    *,
    skip_bad: bool = False,
    progress: bool = False,
) -> tuple[dict[str, tuple[list[Any], list[Any]]], list[str]]:
    """Open every category's splits and decode every image and mask header; report all problems at once.

    Returns ``{category: (train, test)}`` and the problems that ``skip_bad`` let through. Layout problems
    (missing folders, unknown categories, too few references for k) always stop the run.
    """
    from clipfusion.data.checks import check_samples
    from clipfusion.errors import ClipfusionError, InputErrors

    layout: list[str] = []
    files: list[str] = []
    splits: dict[str, tuple[list[Any], list[Any]]] = {}
    for category in categories:
        try:
            train = list(open_split(kind, root, category, "train"))
            test = list(open_split(kind, root, category, "test"))
        except ClipfusionError as exc:
            layout.append(str(exc))
            continue
        train, bad_train = check_samples(train, progress, desc=f"checking {category} train")
        test, bad_test = check_samples(test, progress, desc=f"checking {category} test")
        files += bad_train + bad_test
        if not test:
            layout.append(f"{category}: the test split has no usable images")
        elif not any(s.label == 0 for s in test) or not any(s.label == 1 for s in test):
            layout.append(f"{category}: the test split needs normal and anomalous images for the metrics")
        for k in shots:
            if k > len(train):
                layout.append(
                    f"{category}: {k} references asked for, but the train split has only {len(train)} "
                    "usable images"
                )
        splits[category] = (train, test)
    if layout or (files and not skip_bad):
        hint = [] if skip_bad or not files else ["(use --skip-bad to leave unreadable images out)"]
        raise InputErrors(layout + files + hint)
    return splits, files


def evaluate(
    kind: str,
    root: str | Path,
    out_dir: str | Path,
    *,
    config: CLIPFusionConfig,
    categories: Sequence[str] | None = None,
    shots: Sequence[int] = (0,),
    seeds: Sequence[int] = (0,),
    resume: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    detector_factory: Callable[[CLIPFusionConfig], Any] | None = None,
    log: Callable[[str], None] = print,
    note: str = "",
    skip_bad: bool = False,
    weights_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Run the protocol and return every run's row (including ones resumed from ``out_dir``).

    The data set is checked (:func:`check_dataset`) before any model is loaded; with ``skip_bad`` unreadable
    images are left out (and listed in ``results.json``) instead of stopping the run. The detector is
    ``detector_factory(config)`` when given (tests, an already-loaded detector), else a :class:`CLIPFusion`
    loading its weights from ``weights_dir`` or the hub cache.
    """
    from clipfusion.data import load_mask, sample_references
    from clipfusion.metrics import image_metrics, pixel_metrics

    names = dataset_categories(kind, root, categories)
    plan = run_plan(names, shots, seeds)
    splits, skipped = check_dataset(kind, root, names, shots, skip_bad=skip_bad, progress=progress)
    for line in skipped:
        log(f"skipped: {line}")

    header = {
        "dataset": kind,
        "root": str(Path(root).resolve()),
        "config": config.to_dict(),
        "versions": software_versions(),
        "protocol": {"shots": list(shots), "seeds": list(seeds), "zero_shot_runs_once": True},
        "skipped": skipped,
        "weights": weights_label(config),
    }
    store = ResultStore(out_dir, header, resume, note=note)
    done = store.done()
    todo = [key for key in plan if key not in done]
    if resume and len(todo) < len(plan):
        log(f"resuming: {len(plan) - len(todo)} of {len(plan)} runs already done in {out_dir}")
    if not todo:
        store.save()
        return store.runs

    if detector_factory is None:
        from clipfusion.detector import CLIPFusion

        log(f"loading the models ({config.preset} preset, device {config.device}, {config.dtype})")
        detector = CLIPFusion(config, weights_dir=weights_dir)
    else:
        detector = detector_factory(config)
    if hasattr(detector, "resolved"):  # what "auto" became on this machine, beside the configuration
        store.header["resolved"] = detector.resolved
    # every category's prompts are computed now; the text encoders are then dead weight
    detector.prepare(dict.fromkeys(key.category for key in todo)).release_text_encoders()
    size = config.output_size
    for index, key in enumerate(todo, 1):
        train, test = splits[key.category]
        log(
            f"[{index}/{len(todo)}] {key.category}: {'zero-shot' if key.shots == 0 else f'{key.shots}-shot'}"
            f" seed {key.seed}, {len(test)} test images"
        )
        refs = sample_references(list(train), key.shots, key.seed)
        start = time.perf_counter()
        detector.fit(key.category, [r.image_path for r in refs])
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        results = detector.predict([s.image_path for s in test], batch_size=batch_size, progress=progress)
        predict_s = time.perf_counter() - start

        labels = np.array([s.label for s in test], dtype=np.int64)
        scores = np.array([r.score for r in results], dtype=np.float64)
        row: dict[str, Any] = {"category": key.category, "shots": key.shots, "seed": key.seed}
        row.update({f"image_{k}": v for k, v in image_metrics(labels, scores).items()})
        has_masks = all(s.mask_path is not None for s in test if s.label == 1)
        if has_masks and labels.any():
            masks = np.stack(
                [
                    load_mask(s.mask_path, size=(size, size)) if s.mask_path else np.zeros((size, size), bool)
                    for s in test
                ]
            )
            maps = np.stack([r.anomaly_map for r in results])
            row.update({f"pixel_{k}": v for k, v in pixel_metrics(masks, maps).items()})
        else:
            row.update({c: math.nan for c in METRIC_COLUMNS if c.startswith("pixel_")})
        row["references"] = [
            str(Path(r.image_path).relative_to(Path(root)))
            if _within(r.image_path, root)
            else str(r.image_path)
            for r in refs
        ]
        row["n_test"] = len(test)
        row["n_anomalous"] = int(labels.sum())
        row["timings"] = {
            "fit_s": round(fit_s, 4),
            "predict_s": round(predict_s, 4),
            "ms_per_image": round(1000 * predict_s / len(test), 2),
        }
        store.add(_json_safe(row))
    return store.runs


def _within(path: str | Path, root: str | Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    # NaN is not JSON; a missing pixel metric (no masks) is stored as null
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


__all__ = ["check_dataset", "evaluate", "run_plan"]
