"""The benchmark protocol: per category, shot count and seed, draw references, predict the whole test
split, compute image and pixel metrics, and save results as soon as each run finishes.

Outputs in ``out_dir``: ``results.csv`` (one row per category, shots and seed; metrics as fractions),
``results.json`` (the same plus configuration, reference files, timings and software versions) and
``summary.md`` (per-category tables, mean ± std over seeds, in percent).
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipfusion.config import CLIPFusionConfig
from clipfusion.errors import ConfigError, InputError
from clipfusion.io_utils import atomic_write_text

METRIC_COLUMNS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
)
CSV_COLUMNS = ("category", "shots", "seed", *METRIC_COLUMNS)
DATASET_KINDS = ("mvtec", "visa", "folder")
SUMMARY_HEADERS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "PRO")


@dataclass(frozen=True)
class RunKey:
    category: str
    shots: int
    seed: int


# -- data sets --


def dataset_categories(kind: str, root: str | Path, categories: Sequence[str] | None = None) -> list[str]:
    """The categories to evaluate: those asked for, else every category of the data set found under root.

    For ``folder``, ``root`` is either one product folder (``train/good`` directly under it) or a folder of
    product folders; the category of a single product is the folder's name.
    """
    from clipfusion.data import MVTEC_CATEGORIES, VISA_CATEGORIES

    root = Path(root)
    if kind not in DATASET_KINDS:
        raise ConfigError(f"unknown dataset {kind!r}; choose one of {', '.join(DATASET_KINDS)}")
    if not root.is_dir():
        raise InputError(f"{root}: data set root does not exist or is not a folder")
    if categories:
        return list(categories)
    if kind == "mvtec":
        return [c for c in MVTEC_CATEGORIES if (root / c).is_dir()] or list(MVTEC_CATEGORIES)
    if kind == "visa":
        return list(VISA_CATEGORIES)
    if (root / "train" / "good").is_dir():
        return [root.name]
    found = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not found:
        raise InputError(f"{root}: no product folder with train/good found (expected the MVTec layout)")
    return found


def open_split(kind: str, root: str | Path, category: str, split: str):
    from clipfusion.data import FolderDataset, MVTecAD, VisA

    root = Path(root)
    if kind == "mvtec":
        return MVTecAD(root, category, split)
    if kind == "visa":
        return VisA(root, category, split)
    product = root if root.name == category and (root / "train").is_dir() else root / category
    return FolderDataset(product, split)


# -- results files --


def software_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in (
        "clipfusion",
        "torch",
        "torchvision",
        "open_clip_torch",
        "diffusers",
        "transformers",
        "numpy",
    ):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6f}"


def results_csv(runs: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for run in runs:
        writer.writerow([run["category"], run["shots"], run["seed"], *(_fmt(run[c]) for c in METRIC_COLUMNS)])
    return buf.getvalue()


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def _cell(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.1f}" if n <= 1 else f"{100 * mean:.1f} ± {100 * std:.1f}"


def summary_markdown(
    runs: Sequence[dict[str, Any]], title: str = "CLIPFusion results", note: str = ""
) -> str:
    """Per shot count, a table of categories × metrics (percent): per category the mean ± std over seeds;
    the last row the mean over categories, its ± the std over seeds of the per-seed category means."""
    lines = [f"# {title}", ""]
    if note:
        lines += [note, ""]
    for shots in sorted({r["shots"] for r in runs}):
        subset = [r for r in runs if r["shots"] == shots]
        seeds = sorted({r["seed"] for r in subset})
        categories = list(dict.fromkeys(r["category"] for r in subset))
        regime = "zero-shot" if shots == 0 else f"{shots}-shot"
        lines += [
            f"## {regime} ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}: {', '.join(map(str, seeds))})",
            "",
            "| Category | " + " | ".join(SUMMARY_HEADERS) + " |",
            "|---|" + "---:|" * len(SUMMARY_HEADERS),
        ]
        for category in categories:
            cells = []
            for column in METRIC_COLUMNS:
                values = [r[column] for r in subset if r["category"] == category]
                cells.append(_cell(*_mean_std(values), n=len(values)))
            lines.append(f"| {category} | " + " | ".join(cells) + " |")
        cells = []
        for column in METRIC_COLUMNS:
            per_seed = []
            for seed in seeds:
                values = [r[column] for r in subset if r["seed"] == seed]
                mean, _ = _mean_std(values)
                if not math.isnan(mean):
                    per_seed.append(mean)
            cells.append(_cell(*_mean_std(per_seed), n=len(per_seed)))
        lines.append("| **mean** | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


class ResultStore:
    """The three result files of one evaluation, rewritten atomically after every finished run."""

    def __init__(self, out_dir: str | Path, header: dict[str, Any], resume: bool, note: str = "") -> None:
        self.out_dir = Path(out_dir)
        self.header = header
        self.note = note
        self.runs: list[dict[str, Any]] = []
        json_path = self.out_dir / "results.json"
        if resume and json_path.exists():
            try:
                previous = json.loads(json_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise InputError(f"{json_path}: cannot resume, the file is unreadable ({exc})") from exc
            if previous.get("config") != header["config"]:
                raise InputError(
                    f"{json_path}: cannot resume, it was written with a different configuration; "
                    "use another --out folder or the same options"
                )
            self.runs = list(previous.get("runs", []))
        elif not resume and json_path.exists():
            # a fresh run replaces old results rather than mixing with them
            self.runs = []

    def done(self) -> set[RunKey]:
        return {RunKey(r["category"], int(r["shots"]), int(r["seed"])) for r in self.runs}

    def add(self, run: dict[str, Any]) -> None:
        key = RunKey(run["category"], run["shots"], run["seed"])
        self.runs = [r for r in self.runs if RunKey(r["category"], r["shots"], r["seed"]) != key] + [run]
        self.save()

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / "results.csv", results_csv(self.runs))
        payload = {**self.header, "runs": self.runs}
        atomic_write_text(self.out_dir / "results.json", json.dumps(payload, indent=2) + "\n")
        atomic_write_text(self.out_dir / "summary.md", summary_markdown(self.runs, note=self.note))


# -- the protocol --


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
    from clipfusion.errors import ClipfusionError, InputErrors
    from clipfusion.validation import check_samples

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
) -> list[dict[str, Any]]:
    """Run the protocol and return every run's row (including ones resumed from ``out_dir``).

    The data set is checked (:func:`check_dataset`) before any model is loaded; with ``skip_bad`` unreadable
    images are left out (and listed in ``results.json``) instead of stopping the run.
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
    }
    store = ResultStore(out_dir, header, resume, note=note)
    done = store.done()
    todo = [key for key in plan if key not in done]
    if resume and len(todo) < len(plan):
        log(f"resuming: {len(plan) - len(todo)} of {len(plan)} runs already done in {out_dir}")
    if not todo:
        store.save()
        return store.runs

    from clipfusion.detector import CLIPFusion

    detector = (detector_factory or CLIPFusion)(config)
    if hasattr(detector, "release_text_encoders"):
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


__all__ = [
    "CSV_COLUMNS",
    "METRIC_COLUMNS",
    "ResultStore",
    "RunKey",
    "dataset_categories",
    "evaluate",
    "results_csv",
    "run_plan",
    "summary_markdown",
]
