"""``clipfusion sweep``: every fusion option of a grid re-evaluated from stored maps, without a model.

A run stored with ``evaluate --save-maps`` holds each component map at its native resolution
(:mod:`clipfusion.evaluation.maps_store`). The fusion options (α of Eq. 4 and Eq. 9, σ, the score rule and
the terms) only act after the branches, so each grid point is the stored maps through the same
:func:`clipfusion.fusion.fuse_components` steps as in the run, then every metric of the protocol: a point
equals a separate ``evaluate`` with its configuration (same references). The stored configuration itself is
recomputed too and compared with ``results.json``, which checks the file and the claim at once.

Cost: the resize and the smoothing run once per σ and map, the sums of Eq. 4 once per σ and terms, and a
fused map and its pixel metrics (one sort of every pixel: the dominant cost) once per distinct σ, terms and
α of Eq. 4 — α of Eq. 9 and the score rule do not change the map. The masks' regions are labelled once per
run, and the fused maps of an α sweep are written into the same memory every time.

Outputs (``<run>/sweep`` unless told): ``sweep.csv`` (one row per grid point × category × shots × seed,
metrics as fractions), ``sweep.md`` (per shot count, each point's mean over categories in percent, ± the
std over seeds, best values in bold, the best point by ``best_by`` starred), ``sweep.json`` (grid, base
configuration, rows) and PNG plots (a metric against each swept option, heat maps over pairs of options;
the other options at the best point).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipfusion.config import CLIPFusionConfig, from_dict
from clipfusion.errors import ConfigError, InputError
from clipfusion.evaluation.gridspec import (
    FUSION_OPTIONS,
    Grid,
    Point,
    apply_point,
    config_value,
    grid_points,
    point_label,
    short_key,
    value_text,
)
from clipfusion.evaluation.results import METRIC_COLUMNS, SUMMARY_HEADERS, cell_text, mean_std
from clipfusion.files import read_json
from clipfusion.provenance import RANDOM_ABLATION_NOTE

#: heads every table of a sweep over random weights (:data:`clipfusion.provenance.RANDOM_ABLATION_NOTE`)
RANDOM_NOTE = RANDOM_ABLATION_NOTE


@dataclass
class SweepResult:
    out_dir: Path
    points: list[Point]
    rows: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)
    #: largest |difference| between the stored configuration recomputed here and results.json (None: no file)
    check: float | None = None
    seconds: float = 0.0
    #: options of the grid left at their stored value, each with why it cannot change a metric of these runs
    inert: dict[str, str] = field(default_factory=dict)


def sweep(
    run_dir: str | Path,
    grid: Grid,
    *,
    out_dir: str | Path | None = None,
    best_by: str = "image_auroc",
    plots: bool = True,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Recompute the fusion and the metrics of every run in ``run_dir`` for every point of ``grid``."""
    from clipfusion.evaluation.maps_store import has_masks, list_maps_files, load_run_header, load_run_maps
    from clipfusion.evaluation.results import RunKey
    from clipfusion.progress import progress_bar

    started = time.perf_counter()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run folder")
    if best_by not in METRIC_COLUMNS:
        raise ConfigError(f"--best-by must be one of {', '.join(METRIC_COLUMNS)}, got {best_by!r}")
    unknown = [k for k in grid if k not in FUSION_OPTIONS]
    if unknown:
        raise ConfigError(
            f"sweep grids fusion options only ({', '.join(FUSION_OPTIONS)}); {', '.join(unknown)} changes "
            "the maps: use `clipfusion evaluate --grid`"
        )
    files = list_maps_files(run_dir)
    if not files:
        hint = " (a grid folder: pass one of its point folders)" if (run_dir / "grid.json").exists() else ""
        raise InputError(
            f"{run_dir}: no stored maps (maps/*.npz){hint}; run `clipfusion evaluate ... --save-maps --out "
            f"{run_dir}` first"
        )
    headers = [load_run_header(path) for path in files]
    base_dict = headers[0][0]
    for path, (config, _) in zip(files, headers, strict=True):
        if config != base_dict:
            raise InputError(f"{path}: stored with another configuration than {files[0].name}")
    base = from_dict(CLIPFusionConfig, base_dict, where=f"{files[0]} config")
    inert = inert_options(grid, base, masks=any(has_masks(path) for path in files))
    for key, why in inert.items():
        for value in grid[key]:  # still a valid value, even if it cannot change anything here
            apply_point(base, {key: value})
        # one line instead of a table of identical rows
        stored = value_text(config_value(base, key))
        log(
            f"{key} cannot change any metric of these runs ({why}): swept at its stored value {stored} "
            f"only, not at {len(grid[key])} values"
        )
    grid = {k: v for k, v in grid.items() if k not in inert}
    points = grid_points(grid)
    configs = [apply_point(base, point) for point in points]
    stored = _stored_rows(run_dir)

    rows: list[dict[str, Any]] = []
    check: float | None = None if stored is None else 0.0
    bar = progress_bar(len(files), "sweep", enabled=progress)
    try:
        for path in files:
            run = load_run_maps(path)
            key = RunKey(run.category, run.shots, run.seed)
            metrics = _run_points(run, [*configs, base])
            for index, (point, values) in enumerate(zip(points, metrics, strict=False)):
                row = {"point": index + 1, **{k: value_text(v) for k, v in point.items()}}
                row.update(category=key.category, shots=key.shots, seed=key.seed, **values)
                rows.append(row)
            if stored is not None:
                check = max(check or 0.0, _difference(metrics[-1], stored.get(key), path))
            bar.update(1)
    finally:
        bar.close()

    out = Path(out_dir) if out_dir is not None else run_dir / "sweep"
    note = RANDOM_ABLATION_NOTE if base.random_weights else ""
    result = SweepResult(out, points, rows, check=check, inert=inert)
    result.files = _write_outputs(result, grid, base, run_dir, best_by, note, plots, log)
    result.seconds = time.perf_counter() - started
    return result


def inert_options(grid: Grid, base: CLIPFusionConfig, *, masks: bool) -> dict[str, str]:
    """The options of ``grid`` that cannot change any metric of runs with (or without) ground-truth masks,
    each with the reason: sweeping them would write the same row once per value.

    α of Eq. 4 (``alpha_map``) weighs the fused map, which the pixel metrics read (only with masks) and the
    image score reads only under ``score_mode = "max"`` (Eq. 9 takes the maxima of the component maps)."""
    inert = {}
    modes = set(grid.get("score_mode", [base.score_mode]))
    if "alpha_map" in grid and not masks and "max" not in modes:
        inert["alpha_map"] = (
            "no ground-truth masks, so no pixel metrics, and the image score of score_mode terms does not "
            "read the fused map"
        )
    return inert


def _stored_rows(run_dir: Path) -> dict[Any, dict[str, Any]] | None:
    from clipfusion.evaluation.results import RunKey

    path = run_dir / "results.json"
    if not path.exists():
        return None
    data = read_json(path, "results file")
    try:
        return {RunKey(r["category"], int(r["shots"]), int(r["seed"])): r for r in data.get("runs", [])}
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: not a clipfusion results file ({type(exc).__name__}: {exc})") from exc


def _difference(ours: dict[str, float], theirs: dict[str, Any] | None, path: Path) -> float:
    if theirs is None:
        raise InputError(f"{path}: its run is not in results.json (maps of another evaluation?)")
    worst = 0.0
    for column in METRIC_COLUMNS:
        a, b = ours.get(column), theirs.get(column)
        a = None if a is None or (isinstance(a, float) and math.isnan(a)) else a
        if (a is None) != (b is None):
            return math.inf
        if a is not None:
            worst = max(worst, abs(float(a) - float(b)))
    return worst


def _run_points(run: Any, configs: list[CLIPFusionConfig]) -> list[dict[str, float]]:
    """Metrics of one stored run under each configuration (they differ in fusion options only).

    The fusion's own steps (:mod:`clipfusion.fusion`), shared where the options allow: smoothing per σ, the
    sums of Eq. 4 and each map's maximum per σ and terms, a fused map and its pixel metrics per distinct
    (σ, terms, α of Eq. 4), an image score per distinct (σ, terms, α of Eq. 9, score rule).
    """
    import torch

    from clipfusion.fusion import MAP_NAMES, image_scores, select_terms, smooth_components, term_sums, weigh
    from clipfusion.metrics import PixelScorer, image_metrics

    components = run.components()
    maps = {name: components[name] for name in MAP_NAMES if name in components}
    s_clip_L = components.get("s_clip_L")
    size = configs[0].output_size
    labels = run.labels
    image_rows: list[dict[str, float] | None] = [None] * len(configs)
    pixel_of: list[Any] = [None] * len(configs)
    pixel_jobs: dict[tuple[Any, ...], dict[str, float]] = {}
    # the masks' regions are labelled once for all the points of the run
    pixel_metrics = PixelScorer(run.masks) if run.masks is not None else None
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None
    for sigma in dict.fromkeys(c.sigma for c in configs):
        smoothed = smooth_components(maps, sigma=sigma, output_size=size)
        shared: dict[tuple[str, ...], tuple[Any, ...]] = {}  # per kept terms: maps, s_clip_L, sums, peaks
        scores: dict[tuple[Any, ...], dict[str, float]] = {}
        for i, cfg in enumerate(configs):
            if cfg.sigma != sigma:
                continue
            try:
                kept, s_kept = select_terms(smoothed, s_clip_L, cfg.terms)
            except ConfigError:
                continue  # none of the terms exists in this run (memory-bank maps in a zero-shot run)
            terms = tuple(kept)
            if terms not in shared:
                peaks = {k: v.flatten(1).amax(dim=1) for k, v in kept.items()}
                shared[terms] = (kept, s_kept, term_sums(kept), peaks)
            kept, s_kept, sums, peaks = shared[terms]
            score_key = (terms, cfg.alpha_score, cfg.score_mode)
            if score_key not in scores:
                score = image_scores(
                    kept,
                    s_kept,
                    alpha_score=cfg.alpha_score,
                    score_mode=cfg.score_mode,
                    sums=sums,
                    peaks=peaks,
                )
                values = image_metrics(labels, score.numpy().astype(np.float64))
                scores[score_key] = {f"image_{k}": v for k, v in values.items()}
            image_rows[i] = scores[score_key]
            if pixel_metrics is None:
                continue
            job = (sigma, cfg.alpha_map, terms)
            if job not in pixel_jobs:
                # computed into the same two buffers every time: no fresh N·S² allocation per point
                buffers = buffers or (torch.empty_like(sums[0]), torch.empty_like(sums[0]))
                pixel_jobs[job] = pixel_metrics(weigh(sums, cfg.alpha_map, out=buffers).numpy())
            pixel_of[i] = job
        del smoothed, shared
    out = []
    for image_row, job in zip(image_rows, pixel_of, strict=True):
        row = {c: math.nan for c in METRIC_COLUMNS}
        if image_row is not None:
            row.update(image_row)
        if job is not None:
            value = pixel_jobs[job]
            row.update({f"pixel_{k}": v for k, v in value.items()})
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------
# tables and plots


def aggregate(rows: list[dict[str, Any]], shots: int) -> dict[int, dict[str, tuple[float, float, int]]]:
    """Per point (its 1-based index): per metric, the mean over categories, ± the std over seeds of the
    per-seed category means, and the number of seeds (as ``summary.md``'s mean row)."""
    subset = [r for r in rows if r["shots"] == shots]
    seeds = sorted({r["seed"] for r in subset})
    out: dict[int, dict[str, tuple[float, float, int]]] = {}
    for point in sorted({r["point"] for r in subset}):
        mine = [r for r in subset if r["point"] == point]
        cells = {}
        for column in METRIC_COLUMNS:
            per_seed = []
            for seed in seeds:
                mean, _ = mean_std([r[column] for r in mine if r["seed"] == seed])
                if not math.isnan(mean):
                    per_seed.append(mean)
            mean, std = mean_std(per_seed)
            cells[column] = (mean, std, len(per_seed))
        out[point] = cells
    return out


def _best(table: dict[int, dict[str, tuple[float, float, int]]], column: str) -> int | None:
    scored = [(cells[column][0], -p, p) for p, cells in table.items() if not math.isnan(cells[column][0])]
    return max(scored)[2] if scored else None


def sweep_markdown(
    rows: list[dict[str, Any]],
    points: list[Point],
    grid: Grid,
    *,
    base: CLIPFusionConfig,
    run_dir: Path,
    best_by: str,
    note: str = "",
    check: float | None = None,
    inert: dict[str, str] | None = None,
) -> str:
    keys = list(grid)
    label = dict(zip(METRIC_COLUMNS, SUMMARY_HEADERS, strict=True))
    categories = sorted({r["category"] for r in rows})
    lines = [f"# Sweep of {run_dir}", ""]
    if note:
        lines += [f"**{note}**", ""]
    stored = ", ".join(f"{k}={value_text(config_value(base, k))}" for k in FUSION_OPTIONS)
    lines += [
        f"Recomputed from the stored maps of {len(categories)} "
        f"categor{'y' if len(categories) == 1 else 'ies'} ({', '.join(categories)}); stored configuration: "
        f"{stored}.",
        "Cells: mean over categories in percent, ± the std over seeds of the per-seed means; the best value "
        f"of each column in bold, ★ the best point by {label[best_by]}.",
    ]
    for key, why in (inert or {}).items():
        lines.append(f"Not swept: {key} cannot change any metric of these runs ({why}).")
    if check is not None:
        verdict = "reproduces" if check <= 1e-6 else "DOES NOT reproduce"
        lines.append(
            f"Check: the stored configuration recomputed here {verdict} results.json (largest difference "
            f"{check:.1e} over every metric of every run)."
        )
    lines.append("")
    for shots in sorted({r["shots"] for r in rows}):
        table = aggregate(rows, shots)
        seeds = sorted({r["seed"] for r in rows if r["shots"] == shots})
        regime = "zero-shot" if shots == 0 else f"{shots}-shot"
        lines += [
            f"## {regime} ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}: {', '.join(map(str, seeds))})",
            "",
            "| # | "
            + " | ".join(short_key(k) for k in keys)
            + (" | " if keys else "")
            + " | ".join(SUMMARY_HEADERS)
            + " |",
            "|---:|" + "---|" * len(keys) + "---:|" * len(SUMMARY_HEADERS),
        ]
        best = {column: _best(table, column) for column in METRIC_COLUMNS}
        for p, cells in table.items():
            values = [value_text(points[p - 1][k]) for k in keys]
            out = []
            for column in METRIC_COLUMNS:
                text = cell_text(*cells[column])
                out.append(f"**{text}**" if best[column] == p and text != "–" else text)
            star = " ★" if best[best_by] == p else ""
            lines.append(
                f"| {p}{star} | " + " | ".join(values) + (" | " if keys else "") + " | ".join(out) + " |"
            )
        lines.append("")
        for column in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            p = best[column]
            if p is not None:
                lines.append(f"- best {label[column]}: #{p} ({point_label(points[p - 1])})")
        lines.append("")
    return "\n".join(lines)


def sweep_csv(rows: list[dict[str, Any]], keys: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["point", *keys, "category", "shots", "seed", *METRIC_COLUMNS])
    for row in rows:
        metrics = ["" if math.isnan(row[c]) else f"{row[c]:.6f}" for c in METRIC_COLUMNS]
        writer.writerow(
            [row["point"], *(row[k] for k in keys), row["category"], row["shots"], row["seed"], *metrics]
        )
    return buf.getvalue()


def _write_outputs(
    result: SweepResult,
    grid: Grid,
    base: CLIPFusionConfig,
    run_dir: Path,
    best_by: str,
    note: str,
    plots: bool,
    log: Callable[[str], None],
) -> list[Path]:
    from clipfusion.files import atomic_write_text

    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    keys = list(grid)
    written = []
    atomic_write_text(out / "sweep.csv", sweep_csv(result.rows, keys))
    markdown = sweep_markdown(
        result.rows,
        result.points,
        grid,
        base=base,
        run_dir=run_dir,
        best_by=best_by,
        note=note,
        check=result.check,
        inert=result.inert,
    )
    atomic_write_text(out / "sweep.md", markdown)
    payload = {
        "run_dir": str(run_dir.resolve()),
        "grid": {k: [value_text(v) for v in values] for k, values in grid.items()},
        "config": base.to_dict(),
        "random_weights": base.random_weights,
        "best_by": best_by,
        "check_max_difference": result.check,
        "rows": [
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in result.rows
        ],
    }
    atomic_write_text(out / "sweep.json", json.dumps(payload, indent=2) + "\n")
    written += [out / "sweep.csv", out / "sweep.md", out / "sweep.json"]
    if plots:
        from clipfusion.evaluation import plots as plotting

        if not plotting.available():
            log("plots skipped: matplotlib is not installed (pip install 'clipfusion[plots]')")
        else:
            written += _plots(result, grid, best_by, note)
    return written


def _slice_values(
    table: dict[int, dict[str, tuple[float, float, int]]], points: list[Point], fixed: Point, free: list[str]
) -> dict[tuple[str, ...], int]:
    """Points that agree with ``fixed`` on every option outside ``free``, keyed by their ``free`` values."""
    found = {}
    for p in table:
        point = points[p - 1]
        if all(point[k] == v for k, v in fixed.items() if k not in free):
            found[tuple(value_text(point[k]) for k in free)] = p
    return found


def _plots(result: SweepResult, grid: Grid, best_by: str, note: str) -> list[Path]:
    from clipfusion.evaluation.plots import PLOT_METRICS, heatmap_plot, line_plot

    rows, points, out = result.rows, result.points, result.out_dir
    swept = [k for k, values in grid.items() if len(values) > 1]
    shots_list = sorted({r["shots"] for r in rows})
    tables = {k: aggregate(rows, k) for k in shots_list}
    best = {k: _best(tables[k], best_by) for k in shots_list}
    regime = {k: "zero-shot" if k == 0 else f"{k}-shot" for k in shots_list}
    written = []
    for key in swept:
        values = grid[key]
        series: dict[str, dict[str, list[float]]] = {}
        for k in shots_list:
            if best[k] is None:
                continue
            fixed = points[best[k] - 1]
            found = _slice_values(tables[k], points, fixed, [key])
            others = " ".join(f"{short_key(o)}={value_text(fixed[o])}" for o in grid if o != key)
            series[f"{regime[k]}" + (f" ({others})" if others else "")] = {
                label: [
                    100 * tables[k][found[(value_text(v),)]][column][0]
                    if (value_text(v),) in found
                    else math.nan
                    for v in values
                ]
                for column, label in PLOT_METRICS
            }
        path = out / f"sweep_{short_key(key)}.png"
        written.append(
            line_plot(
                path,
                x_label=short_key(key),
                x_values=[v if not isinstance(v, tuple) else value_text(v) for v in values],
                series=series,
                title=f"metric against {short_key(key)}; other options at the best point by {best_by}",
                note=note,
            )
        )
    for i, row_key in enumerate(swept):
        for col_key in swept[i + 1 :]:
            panels = []
            for k in shots_list:
                if best[k] is None:
                    continue
                fixed = points[best[k] - 1]
                found = _slice_values(tables[k], points, fixed, [row_key, col_key])
                panel = []
                for column, label in PLOT_METRICS:
                    values = [
                        [
                            100 * tables[k][found[(value_text(a), value_text(b))]][column][0]
                            if (value_text(a), value_text(b)) in found
                            else math.nan
                            for b in grid[col_key]
                        ]
                        for a in grid[row_key]
                    ]
                    panel.append((f"{regime[k]}: {label}", values))
                panels.append(panel)
            path = out / f"sweep_heatmap_{short_key(row_key)}_{short_key(col_key)}.png"
            written.append(
                heatmap_plot(
                    path,
                    row_label=short_key(row_key),
                    row_values=[value_text(v) for v in grid[row_key]],
                    col_label=short_key(col_key),
                    col_values=[value_text(v) for v in grid[col_key]],
                    panels=panels,
                    title=f"mean over categories and seeds (%); other options at the best point by {best_by}",
                    note=note,
                )
            )
    return written


__all__ = ["RANDOM_NOTE", "SweepResult", "aggregate", "sweep", "sweep_csv", "sweep_markdown"]
