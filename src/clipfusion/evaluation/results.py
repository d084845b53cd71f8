"""The result files of an evaluation, rewritten atomically after every finished run.

``results.csv`` (one row per category, shots and seed; metrics as fractions), ``results.json`` (the same plus
configuration, what its ``auto`` placement resolved to, reference files, timings and software versions) and
``summary.md`` (per-category tables, mean ± std over seeds, in percent).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipfusion.errors import InputError
from clipfusion.files import atomic_write_text, read_json

METRIC_COLUMNS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
)
#: ``weights``: ``pretrained``, or ``random`` for a pipeline demonstration whose metrics mean nothing
CSV_COLUMNS = ("category", "shots", "seed", *METRIC_COLUMNS, "weights")
SUMMARY_HEADERS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "PRO")


@dataclass(frozen=True)
class RunKey:
    category: str
    shots: int
    seed: int


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6f}"


def results_csv(runs: Sequence[dict[str, Any]], weights: str = "pretrained") -> str:
    """One row per run; ``weights`` (``pretrained`` or ``random``) fills the column of runs that do not
    carry their own."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for run in runs:
        metrics = (_fmt(run[c]) for c in METRIC_COLUMNS)
        writer.writerow([run["category"], run["shots"], run["seed"], *metrics, run.get("weights", weights)])
    return buf.getvalue()


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the values that are numbers (NaN, NaN when none is): what a
    table reports over seeds, so that a run without a metric does not turn the whole cell into NaN."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def cell_text(mean: float, std: float, n: int) -> str:
    """A table cell in percent: the mean alone for one value, ``mean ± std`` for several, ``–`` for none."""
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
                cells.append(cell_text(*mean_std(values), n=len(values)))
            lines.append(f"| {category} | " + " | ".join(cells) + " |")
        cells = []
        for column in METRIC_COLUMNS:
            per_seed = []
            for seed in seeds:
                values = [r[column] for r in subset if r["seed"] == seed]
                mean, _ = mean_std(values)
                if not math.isnan(mean):
                    per_seed.append(mean)
            cells.append(cell_text(*mean_std(per_seed), n=len(per_seed)))
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
            previous = read_json(json_path, "results file", hint="cannot resume from it")
            if not isinstance(previous, dict):
                raise InputError(f"{json_path}: not a clipfusion results file; cannot resume from it")
            if previous.get("config") != header["config"]:
                raise InputError(
                    f"{json_path}: cannot resume, it was written with a different configuration; "
                    "use another --out folder or the same options"
                )
            self.runs = list(previous.get("runs", []))
            if "resolved" in previous:  # kept when nothing is left to run (a detector would replace it)
                self.header.setdefault("resolved", previous["resolved"])
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
        weights = self.header.get("weights", {}).get("kind", "pretrained")
        atomic_write_text(self.out_dir / "results.csv", results_csv(self.runs, weights))
        payload = {**self.header, "runs": self.runs}
        atomic_write_text(self.out_dir / "results.json", json.dumps(payload, indent=2) + "\n")
        atomic_write_text(self.out_dir / "summary.md", summary_markdown(self.runs, note=self.note))
