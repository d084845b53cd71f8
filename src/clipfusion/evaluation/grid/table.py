"""The Table-5 view of a grid: ``table.md`` (rows the first option, timestep; columns the second, feature
block; cells pixel AUROC / AUPRO / image AUROC, mean over categories) and its heat maps, ``table.png``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from clipfusion.evaluation.grid.points import GridPoint
from clipfusion.evaluation.gridspec import (
    Grid,
    Point,
    grid_points,
    point_dirname,
    point_label,
    short_key,
    value_text,
)
from clipfusion.evaluation.results import METRIC_COLUMNS


def _table_axes(grid: Grid) -> tuple[str, str | None, list[str]]:
    keys = list(grid)
    if "diffusion.timestep" in grid and "diffusion.feature_blocks" in grid:
        row, col = "diffusion.timestep", "diffusion.feature_blocks"
    else:
        row, col = keys[0], (keys[1] if len(keys) > 1 else None)
    return row, col, [k for k in keys if k not in (row, col)]


def grid_table_markdown(
    points: list[GridPoint], runs: dict[str, list[dict[str, Any]]], grid: Grid, *, note: str = ""
) -> str:
    """Per shot count (and per value of any further option), rows = first option (timestep), columns =
    second (feature block), cells ``P-AUROC / PRO / I-AUROC`` in percent, mean over categories and seeds."""
    from clipfusion.evaluation.sweep import aggregate

    rows = _point_rows(points, runs)
    row_key, col_key, rest = _table_axes(grid)
    lines = ["# Grid over diffusion options", ""]
    if note:
        lines += [note, ""]
    lines += [
        "Cells: pixel AUROC / AUPRO / image AUROC in percent, mean over categories (and over seeds); each "
        "grid point is an ordinary run in its folder (results.csv, summary.md with ± over seeds, maps/ for "
        "`clipfusion sweep`).",
        "",
    ]
    categories = sorted({r["category"] for r in rows})
    if categories:
        lines += [f"Categories: {', '.join(categories)}.", ""]
    for shots in sorted({r["shots"] for r in rows}):
        table = aggregate(rows, shots)
        regime = "zero-shot" if shots == 0 else f"{shots}-shot"
        for fixed in grid_points({k: grid[k] for k in rest}):
            title = f"## {regime}" + (f" — {point_label(fixed)}" if fixed else "")
            cols = grid[col_key] if col_key else [None]
            head = [value_text(c) if c is not None else "" for c in cols]
            lines += [
                title,
                "",
                f"| {short_key(row_key)} \\ {short_key(col_key) if col_key else ''} | "
                + " | ".join(head)
                + " |",
                "|---|" + "---:|" * len(cols),
            ]
            for r in grid[row_key]:
                cells = []
                for c in cols:
                    values = {row_key: r, **({col_key: c} if col_key else {}), **fixed}
                    point = _find(points, values)
                    agg = table.get(point.index + 1) if point is not None else None
                    cells.append(_triple(agg))
                lines.append(f"| {value_text(r)} | " + " | ".join(cells) + " |")
            lines.append("")
    if not rows:
        lines.append("No finished run yet.")
    return "\n".join(lines)


def _point_rows(points: list[GridPoint], runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for point in points:
        for run in runs.get(point.folder.name, []):
            row = {"point": point.index + 1, **run}
            for column in METRIC_COLUMNS:
                if row.get(column) is None:
                    row[column] = math.nan
            rows.append(row)
    return rows


def _find(points: list[GridPoint], values: Point) -> GridPoint | None:
    for point in points:
        if all(point.values[k] == v for k, v in values.items()):
            return point
    return None


def _triple(agg: dict[str, tuple[float, float, int]] | None) -> str:
    if agg is None:
        return "–"
    parts = []
    for column in ("pixel_auroc", "pixel_aupro", "image_auroc"):
        mean = agg[column][0]
        parts.append("–" if math.isnan(mean) else f"{100 * mean:.1f}")
    return " / ".join(parts)


def write_grid_table(
    out_dir: Path,
    points: list[GridPoint],
    runs: dict[str, list[dict[str, Any]]],
    grid: Grid,
    *,
    note: str = "",
) -> list[Path]:
    """``table.md`` and, with matplotlib, ``table.png`` (one heat map per shot count and metric; one PNG per
    value of any option beyond the table's two)."""
    from clipfusion.evaluation import plots
    from clipfusion.evaluation.sweep import aggregate
    from clipfusion.files import atomic_write_text

    path = out_dir / "table.md"
    atomic_write_text(path, grid_table_markdown(points, runs, grid, note=note))
    written = [path]
    rows = _point_rows(points, runs)
    if not rows or not plots.available():
        return written
    row_key, col_key, rest = _table_axes(grid)
    cols = grid[col_key] if col_key else [None]
    for fixed in grid_points({k: grid[k] for k in rest}):
        panels = []
        for shots in sorted({r["shots"] for r in rows}):
            table = aggregate(rows, shots)
            regime = "zero-shot" if shots == 0 else f"{shots}-shot"
            panel = []
            for column, label in (
                ("pixel_auroc", "P-AUROC"),
                ("pixel_aupro", "PRO"),
                ("image_auroc", "I-AUROC"),
            ):
                values = []
                for r in grid[row_key]:
                    line = []
                    for c in cols:
                        point = _find(points, {row_key: r, **({col_key: c} if col_key else {}), **fixed})
                        agg = table.get(point.index + 1) if point is not None else None
                        line.append(100 * agg[column][0] if agg is not None else math.nan)
                    values.append(line)
                panel.append((f"{regime}: {label}", values))
            panels.append(panel)
        name = "table.png" if not fixed else f"table_{point_dirname(fixed)}.png"
        written.append(
            plots.heatmap_plot(
                out_dir / name,
                row_label=short_key(row_key),
                row_values=[value_text(v) for v in grid[row_key]],
                col_label=short_key(col_key) if col_key else "",
                col_values=[value_text(c) if c is not None else "" for c in cols],
                panels=panels,
                title="mean over categories and seeds (%)" + (f" — {point_label(fixed)}" if fixed else ""),
                note=note.strip("*"),
            )
        )
    return written


__all__ = ["grid_table_markdown", "write_grid_table"]
