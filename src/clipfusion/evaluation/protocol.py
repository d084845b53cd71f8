"""The benchmark protocol: per category, shot count and seed, draw references, predict the whole test
split, compute image and pixel metrics, and save results as soon as each run finishes.

Outputs in ``out_dir``: ``results.csv`` (one row per category, shots and seed; metrics as fractions),
``results.json`` (the same plus configuration, reference files, timings and software versions) and
``summary.md`` (per-category tables, mean ± std over seeds, in percent); with ``save_maps``, the component
maps of every run at their native resolution (``maps/*.npz``, :mod:`clipfusion.evaluation.maps_store`).

A run's metrics (:func:`run_metrics`), its row (:func:`run_row`) and its maps file (:func:`save_maps_file`)
are shared with the grid over diffusion options (:mod:`clipfusion.evaluation.grid`) and the sweep of stored
maps (:mod:`clipfusion.evaluation.sweep`), so all three compute a run's numbers the same way.
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
from clipfusion.evaluation.results import METRIC_COLUMNS, ResultStore, RunKey
from clipfusion.provenance import software_versions, weights_record


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


def run_header(
    kind: str,
    root: str | Path,
    config: CLIPFusionConfig,
    shots: Sequence[int],
    seeds: Sequence[int],
    skipped: Sequence[str],
) -> dict[str, Any]:
    """What ``results.json`` records besides the runs (and what ``--resume`` compares: the configuration)."""
    return {
        "dataset": kind,
        "root": str(Path(root).resolve()),
        "config": config.to_dict(),
        "versions": software_versions(),
        "protocol": {"shots": list(shots), "seeds": list(seeds), "zero_shot_runs_once": True},
        "skipped": list(skipped),
        "weights": weights_record(config),
    }


def ground_truth_masks(test: Sequence[Any], size: int) -> np.ndarray | None:
    """``(N, size, size)`` bool masks of a test split (nearest resize; zeros for normal images), or ``None``
    when pixel metrics cannot be computed (no anomalous image, or one without a mask)."""
    from clipfusion.data import load_mask

    has_masks = all(s.mask_path is not None for s in test if s.label == 1)
    if not has_masks or not any(s.label == 1 for s in test):
        return None
    return np.stack(
        [
            load_mask(s.mask_path, size=(size, size)) if s.mask_path else np.zeros((size, size), bool)
            for s in test
        ]
    )


def run_metrics(
    labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None, maps: np.ndarray | None
) -> dict[str, float]:
    """Every metric of the protocol for one run: image metrics of ``scores``, pixel metrics of the fused
    ``maps`` against ``masks`` (NaN without masks)."""
    from clipfusion.metrics import image_metrics, pixel_metrics

    row = {f"image_{k}": v for k, v in image_metrics(labels, np.asarray(scores, dtype=np.float64)).items()}
    if masks is not None and maps is not None:
        row.update({f"pixel_{k}": v for k, v in pixel_metrics(masks, maps).items()})
    else:
        row.update({c: math.nan for c in METRIC_COLUMNS if c.startswith("pixel_")})
    return row


def relative_paths(paths: Sequence[str | Path], root: str | Path) -> list[str]:
    """Paths as results record them: relative to the data set root when inside it, else as given."""
    return [str(Path(p).relative_to(Path(root))) if _within(p, root) else str(p) for p in paths]


def run_row(
    key: RunKey,
    metrics: dict[str, float],
    *,
    references: Sequence[Any],
    test: Sequence[Any],
    root: str | Path,
    timings: dict[str, Any],
) -> dict[str, Any]:
    """One run's entry of ``results.json`` (JSON-safe: missing pixel metrics are null)."""
    row: dict[str, Any] = {"category": key.category, "shots": key.shots, "seed": key.seed, **metrics}
    row["references"] = relative_paths([r.image_path for r in references], root)
    row["n_test"] = len(test)
    row["n_anomalous"] = int(sum(1 for s in test if s.label == 1))
    row["timings"] = timings
    return _json_safe(row)


def save_maps_file(
    out_dir: str | Path,
    key: RunKey,
    *,
    kind: str,
    root: str | Path,
    config: CLIPFusionConfig,
    references: Sequence[Any],
    test: Sequence[Any],
    components: dict[str, np.ndarray],
    s_clip_L: np.ndarray | None,
    masks: np.ndarray | None,
) -> Path:
    """Store one run's native-resolution component maps with its metadata (``maps/*.npz``)."""
    from clipfusion.evaluation.maps_store import maps_file, save_run_maps

    run = {
        "category": key.category,
        "shots": key.shots,
        "seed": key.seed,
        "dataset": kind,
        "root": str(Path(root).resolve()),
        "references": relative_paths([r.image_path for r in references], root),
        "output_size": config.output_size,
    }
    return save_run_maps(
        maps_file(out_dir, key.category, key.shots, key.seed),
        config=config.to_dict(),
        run=run,
        paths=relative_paths([s.image_path for s in test], root),
        labels=[s.label for s in test],
        defect_types=[s.defect_type for s in test],
        mask_paths=[None if s.mask_path is None else relative_paths([s.mask_path], root)[0] for s in test],
        components=components,
        s_clip_L=s_clip_L,
        masks=masks,
    )


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
    save_maps: bool = False,
) -> list[dict[str, Any]]:
    """Run the protocol and return every run's row (including ones resumed from ``out_dir``).

    The data set is checked (:func:`check_dataset`) before any model is loaded; with ``skip_bad`` unreadable
    images are left out (and listed in ``results.json``) instead of stopping the run. The detector is
    ``detector_factory(config)`` when given (tests, an already-loaded detector), else a :class:`CLIPFusion`
    loading its weights from ``weights_dir`` or the hub cache. ``save_maps`` stores every run's component
    maps (``maps/*.npz``) for :func:`clipfusion.evaluation.sweep.sweep`; resuming with it redoes the finished
    runs whose maps file is missing.
    """
    from clipfusion.data import sample_references
    from clipfusion.evaluation.maps_store import clear_maps_files, maps_file

    names = dataset_categories(kind, root, categories)
    plan = run_plan(names, shots, seeds)
    splits, skipped = check_dataset(kind, root, names, shots, skip_bad=skip_bad, progress=progress)
    for line in skipped:
        log(f"skipped: {line}")

    header = run_header(kind, root, config, shots, seeds, skipped)
    store = ResultStore(out_dir, header, resume, note=note)
    if not resume:
        clear_maps_files(out_dir)  # maps of an earlier evaluation must not mix with this one's
    done = store.done()
    if save_maps:
        done = {key for key in done if maps_file(out_dir, key.category, key.shots, key.seed).is_file()}
    todo = [key for key in plan if key not in done]
    if resume and len(todo) < len(plan):
        log(f"resuming: {len(plan) - len(todo)} of {len(plan)} runs already done in {out_dir}")
    if not todo:
        store.save()
        return store.runs

    if detector_factory is None:
        from clipfusion.detector import CLIPFusion

        log(f"loading the models ({config.preset} preset, device {config.device}, {config.dtype})")
        # every category's prompts are encoded while loading, the text encoders freed before the image
        # models load (the lowest peak memory)
        detector = CLIPFusion(
            config, weights_dir=weights_dir, objects=dict.fromkeys(k.category for k in todo)
        )
    else:
        detector = detector_factory(config)
    if hasattr(detector, "resolved"):  # what "auto" became on this machine, beside the configuration
        store.header["resolved"] = detector.resolved
    # a detector from the factory: every category's prompts now, then the text encoders are dead weight
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
        masks = ground_truth_masks(test, size)
        maps = np.stack([r.anomaly_map for r in results]) if masks is not None else None
        timings = {
            "fit_s": round(fit_s, 4),
            "predict_s": round(predict_s, 4),
            "ms_per_image": round(1000 * predict_s / len(test), 2),
        }
        if save_maps:
            components = {
                name: np.stack([r.native_maps[name] for r in results]) for name in results[0].native_maps
            }
            s_clip = results[0].s_clip_L is not None
            save_maps_file(
                out_dir,
                key,
                kind=kind,
                root=root,
                config=config,
                references=refs,
                test=test,
                components=components,
                s_clip_L=np.array([r.s_clip_L for r in results], dtype=np.float32) if s_clip else None,
                masks=masks,
            )
        metrics = run_metrics(labels, scores, masks, maps)
        store.add(run_row(key, metrics, references=refs, test=test, root=root, timings=timings))
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
