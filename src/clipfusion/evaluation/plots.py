"""PNG plots of ablations: a metric against one option, and heat maps over two options.

matplotlib (the ``plots`` extra: ``pip install 'clipfusion[plots]'``) is imported here only, when a plot is
drawn, with its non-interactive Agg backend; without it the tables are still written and :func:`available`
says why there are no plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: metric columns shown in the plots, with their short labels (the paper's Table 5 reports these three)
PLOT_METRICS = (("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"), ("pixel_aupro", "PRO"))


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, note: str) -> Path:
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7, color="#b00020", wrap=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(path)
    _pyplot().close(fig)
    return path


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def line_plot(
    path: Path,
    *,
    x_label: str,
    x_values: Sequence[Any],
    series: dict[str, dict[str, list[float]]],
    title: str,
    note: str = "",
) -> Path:
    """One panel per metric: ``series[line label][metric label]`` (percent) against ``x_values``.

    Numeric options get a numeric axis; others (score rule, terms) one tick per value.
    """
    plt = _pyplot()
    metrics = [label for label in dict.fromkeys(m for lines in series.values() for m in lines)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    numeric = _numeric(x_values)
    xs = list(x_values) if numeric else list(range(len(x_values)))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for label, lines in series.items():
            ys = lines.get(metric)
            if ys is None or all(math.isnan(y) for y in ys):
                continue
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(metric)
        ax.set_xlabel(x_label)
        ax.set_ylabel("%")
        if not numeric:
            ax.set_xticks(xs, [str(v) for v in x_values], rotation=20, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    return _save(fig, path, note)


def heatmap_plot(
    path: Path,
    *,
    row_label: str,
    row_values: Sequence[Any],
    col_label: str,
    col_values: Sequence[Any],
    panels: list[list[tuple[str, list[list[float]]]]],
    title: str,
    note: str = "",
) -> Path:
    """A grid of heat maps: ``panels[r][c] = (title, values[row][col])`` in percent, each cell annotated."""
    import numpy as np

    plt = _pyplot()
    n_rows, n_cols = len(panels), max(len(row) for row in panels)
    width = max(3.0, 0.9 * len(col_values) + 1.8)
    height = max(2.4, 0.45 * len(row_values) + 1.4)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)
    for r, row in enumerate(panels):
        for c in range(n_cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            panel_title, values = row[c]
            data = np.array(values, dtype=float)
            finite = data[np.isfinite(data)]
            image = ax.imshow(
                np.ma.masked_invalid(data),
                cmap="viridis",
                aspect="auto",
                vmin=float(finite.min()) if finite.size else 0.0,
                vmax=float(finite.max()) if finite.size else 1.0,
            )
            low, high = image.get_clim()
            for i in range(data.shape[0]):
                for j in range(data.shape[1]):
                    value = data[i, j]
                    text = "–" if not np.isfinite(value) else f"{value:.1f}"
                    bright = np.isfinite(value) and high > low and (value - low) / (high - low) > 0.6
                    ax.text(
                        j, i, text, ha="center", va="center", fontsize=7, color="black" if bright else "white"
                    )
            ax.set_xticks(range(len(col_values)), [str(v) for v in col_values], fontsize=7, rotation=20)
            ax.set_yticks(range(len(row_values)), [str(v) for v in row_values], fontsize=7)
            ax.set_xlabel(col_label, fontsize=8)
            ax.set_ylabel(row_label, fontsize=8)
            ax.set_title(panel_title, fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    return _save(fig, path, note)


__all__ = ["PLOT_METRICS", "available", "heatmap_plot", "line_plot"]
