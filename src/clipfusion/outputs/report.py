"""Visual output: heat-map overlays, binary masks, and a self-contained HTML report sorted by score.

The report shows the :data:`REPORT_TOP` highest-scoring images as cards and a histogram of every score: a
page with a million thumbnails helps nobody (and weighs gigabytes), while the distribution and the worst
cases are what an inspector reads first.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipfusion.files import atomic_write_bytes, atomic_write_text

NORMALISATIONS = ("set", "image")
#: cards in the HTML report by default: the highest scores; every score still goes into the histogram
REPORT_TOP = 100

# piecewise-linear "jet": blue (normal) → cyan → yellow → red (anomalous), the colour code of this field
_JET_STOPS = np.array(
    [
        [0.0, 0.0, 0.0, 0.5],
        [0.11, 0.0, 0.0, 1.0],
        [0.34, 0.0, 1.0, 1.0],
        [0.65, 1.0, 1.0, 0.0],
        [0.89, 1.0, 0.0, 0.0],
        [1.0, 0.5, 0.0, 0.0],
    ]
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → uint8 RGB (..., 3) through the jet colour map."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _JET_STOPS[:, 0], _JET_STOPS[:, c]) for c in (1, 2, 3)], axis=-1)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def normalise(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    span = vmax - vmin
    if span <= 0:
        return np.zeros_like(anomaly_map, dtype=np.float32)
    return ((anomaly_map - vmin) / span).astype(np.float32)


def overlay(image: Image.Image, heat: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """Blend a normalised heat map (any size, values in [0, 1]) over the image at the image's size."""
    colour = Image.fromarray(colormap(heat)).resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image.convert("RGB"), colour, opacity)


def mask_image(mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A binary mask as a 0/255 PNG at the image's size (nearest, so it stays binary)."""
    return Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)


def save_png(image: Image.Image, path: Path, text: dict[str, str] | None = None) -> None:
    """A PNG, atomically; ``text`` goes into its tEXt chunks (e.g. the random-weights label), which image
    viewers and ``PIL.Image.open(path).text`` show."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def save_npy(array: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    np.save(buf, array.astype(np.float32, copy=False))
    atomic_write_bytes(path, buf.getvalue())


def thumbnail_data_uri(image: Image.Image, size: int = 224) -> str:
    """A small JPEG embedded in the page, so the report is one file that can be mailed around."""
    thumb = image.convert("RGB").copy()
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class ReportEntry:
    name: str
    score: float
    thumbnail: str
    overlay_href: str | None = None
    decision: str | None = None
    label: str | None = None


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:1.4em;margin-bottom:4px}.meta{color:#555;font-size:.9em}
.banner{background:#fff3cd;border:2px solid #d39e00;padding:10px 14px;margin:12px 0;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:14px;margin-top:16px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px;background:#fafafa}
.card img{width:100%;border-radius:4px;display:block}
.card .name{font-size:.8em;word-break:break-all;color:#333;margin-top:4px}
.hist{margin-top:14px}.hist rect{fill:#4a78b5}.hist .thr{stroke:#b00020;stroke-width:2}
.hist text{font-size:11px;fill:#333}
.score{font-weight:700}.anomalous{color:#b00020}.normal{color:#1b7f3b}
table{border-collapse:collapse;margin-top:8px;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px}
"""


def html_report(
    entries: Sequence[ReportEntry],
    *,
    title: str,
    subtitle: str = "",
    banner: str = "",
    details: dict[str, str] | None = None,
    top: int | None = REPORT_TOP,
    scores: Sequence[float] | None = None,
    threshold: float | None = None,
) -> str:
    """Cards of the ``top`` highest-scoring entries (None: all), sorted by descending score, below a
    histogram of ``scores`` (default: the entries' own; a caller with many images passes every score and
    only the entries it may show, so that it never builds a million thumbnails) with ``threshold`` marked.
    A banner (e.g. "random weights") is shown above everything."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if subtitle:
        parts.append(f"<div class='meta'>{esc(subtitle)}</div>")
    if banner:
        parts.append(f"<div class='banner'>{esc(banner)}</div>")
    if details:
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in details.items())
        parts.append(f"<table>{rows}</table>")
    all_scores = [e.score for e in entries] if scores is None else list(scores)
    ranked = sorted(entries, key=lambda e: -e.score)
    shown = ranked if top is None else ranked[:top]
    if all_scores:
        parts.append(score_histogram_svg(all_scores, threshold=threshold))
    if len(shown) < len(all_scores):
        parts.append(
            f"<div class='meta'>showing the {len(shown)} highest of {len(all_scores)} scores; every score is "
            "in scores.csv</div>"
        )
    parts.append("<div class='grid'>")
    for rank, entry in enumerate(shown, 1):
        img = f"<img src='{entry.thumbnail}' alt='{esc(entry.name)}'>"
        if entry.overlay_href:
            img = f"<a href='{esc(entry.overlay_href)}'>{img}</a>"
        decision = ""
        if entry.decision:
            decision = f" <span class='{esc(entry.decision)}'>{esc(entry.decision)}</span>"
        label = f" · truth: {esc(entry.label)}" if entry.label else ""
        parts.append(
            f"<div class='card'>{img}<div>#{rank} <span class='score'>{entry.score:.4f}</span>{decision}"
            f"{label}</div><div class='name'>{esc(entry.name)}</div></div>"
        )
    parts.append("</div></body></html>")
    return "\n".join(parts)


def line_report(objects: Sequence[dict], *, banner: str = "") -> str:
    """The page of a run over several fitted objects: one row per object (its name, what it inspects, how
    many images, how many decided anomalous, its highest score) linking that object's own report — scores of
    different products are on different scales, so they are shown side by side, never pooled."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>clipfusion: {len(objects)} objects</title><style>{_CSS}</style></head><body>",
        f"<h1>clipfusion: {len(objects)} fitted objects</h1>",
        "<div class='meta'>one report per object; every score is in scores.csv</div>",
    ]
    if banner:
        parts.append(f"<div class='banner'>{esc(banner)}</div>")
    rows = ["<tr><th>name</th><th>object</th><th>images</th><th>anomalous</th><th>highest score</th></tr>"]
    for entry in objects:
        anomalous = "–" if entry.get("anomalous") is None else str(entry["anomalous"])
        top = "–" if entry.get("top") is None else f"{entry['top']:.4f}"
        rows.append(
            f"<tr><td><a href='{esc(entry['report'])}'>{esc(entry['name'])}</a></td>"
            f"<td>{esc(entry['object'])}</td><td>{entry['images']}</td><td>{anomalous}</td><td>{top}</td></tr>"
        )
    parts.append(f"<table>{''.join(rows)}</table></body></html>")
    return "\n".join(parts)


def score_histogram_svg(
    scores: Sequence[float], *, threshold: float | None = None, bins: int = 40, width: int = 640
) -> str:
    """An inline SVG histogram of the scores (the page stays one self-contained file), the threshold as a
    red line when known."""
    values = np.asarray(list(scores), dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return ""
    lo, hi = float(values.min()), float(values.max())
    if threshold is not None and np.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    plot_h, top_pad, bottom = 110, 14, 130
    bar_w = width / bins
    peak = max(int(counts.max()), 1)
    bars = []
    for i, count in enumerate(counts):
        if count:
            h = max(1.0, plot_h * count / peak)
            bars.append(
                f"<rect x='{i * bar_w:.1f}' y='{top_pad + plot_h - h:.1f}' width='{max(bar_w - 1, 1):.1f}' "
                f"height='{h:.1f}'><title>{edges[i]:.4f}–{edges[i + 1]:.4f}: {count}</title></rect>"
            )
    if threshold is not None and np.isfinite(threshold):
        x = (threshold - lo) / (hi - lo) * width
        bars.append(f"<line class='thr' x1='{x:.1f}' x2='{x:.1f}' y1='{top_pad}' y2='{top_pad + plot_h}'/>")
        # on the side of the line with room for it: right of a line in the left half, left of one in the
        # right half (a label pushed against the right edge used to run past it)
        anchor, at = ("start", x + 3) if x <= width / 2 else ("end", x - 3)
        bars.append(f"<text x='{at:.1f}' y='11' text-anchor='{anchor}'>threshold {threshold:.4f}</text>")
    labels = (
        f"<text x='0' y='{bottom + 12}'>{lo:.4f}</text>"
        f"<text x='{width}' y='{bottom + 12}' text-anchor='end'>{hi:.4f}</text>"
        f"<text x='{width / 2:.0f}' y='{bottom + 12}' text-anchor='middle'>score ({values.size} images; "
        f"tallest bar {peak})</text>"
    )
    return (
        f"<svg class='hist' width='{width}' height='{bottom + 18}' viewBox='0 0 {width} {bottom + 18}' "
        f"role='img' aria-label='histogram of scores'>{''.join(bars)}"
        f"<line x1='0' x2='{width}' y1='{top_pad + plot_h}' y2='{top_pad + plot_h}' stroke='#999'/>"
        f"{labels}</svg>"
    )


def write_html(path: Path, text: str) -> None:
    atomic_write_text(path, text)
