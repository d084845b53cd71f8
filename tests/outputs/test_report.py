import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from clipfusion.outputs import report


def test_colormap_runs_blue_to_red():
    rgb = report.colormap(np.array([0.0, 0.5, 1.0]))
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 3)
    assert rgb[0, 2] > rgb[0, 0]  # low values are blue
    assert rgb[2, 0] > rgb[2, 2]  # high values are red
    assert report.colormap(np.array([np.nan, -3.0, 7.0])).shape == (3, 3)


def test_normalise_handles_flat_maps():
    flat = np.full((4, 4), 2.0, dtype=np.float32)
    assert not report.normalise(flat, 2.0, 2.0).any()
    out = report.normalise(np.array([1.0, 3.0]), 1.0, 3.0)
    assert out.tolist() == [0.0, 1.0]


def test_overlay_and_mask_come_out_at_the_image_size():
    image = Image.new("RGB", (50, 30), (10, 200, 10))
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[4:, 4:] = 1.0
    over = report.overlay(image, heat)
    assert over.size == (50, 30)
    mask = report.mask_image(heat > 0.5, image.size)
    values = set(np.unique(np.asarray(mask)).tolist())
    assert mask.size == (50, 30) and values == {0, 255}


def test_html_report_sorts_by_score_and_shows_the_banner():
    thumb = report.thumbnail_data_uri(Image.new("RGB", (300, 200)))
    assert thumb.startswith("data:image/jpeg;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(thumb.split(",", 1)[1])))
    assert max(decoded.size) <= 224
    entries = [
        report.ReportEntry(name="low.png", score=0.1, thumbnail=thumb),
        report.ReportEntry(name="high.png", score=0.9, thumbnail=thumb, decision="anomalous"),
        report.ReportEntry(name="<mid>.png", score=0.5, thumbnail=thumb),
    ]
    page = report.html_report(entries, title="t", banner="RANDOM WEIGHTS")
    order = [m for m in re.findall(r"class='name'>([^<]+)<", page)]
    assert order == ["high.png", "&lt;mid&gt;.png", "low.png"]
    assert "RANDOM WEIGHTS" in page and "class='anomalous'" in page


def test_the_report_shows_the_top_scores_and_a_histogram_of_all():
    thumb = report.thumbnail_data_uri(Image.new("RGB", (8, 8)))
    scores = [i / 1000 for i in range(1000)]
    shown = [report.ReportEntry(name=f"{s:.3f}.png", score=s, thumbnail=thumb) for s in scores[-250:]]
    page = report.html_report(shown, title="t", top=5, scores=scores, threshold=0.9)
    names = re.findall(r"class='name'>([^<]+)<", page)
    assert names == ["0.999.png", "0.998.png", "0.997.png", "0.996.png", "0.995.png"]
    assert "showing the 5 highest of 1000 scores" in page
    bars = re.findall(r"<rect [^>]*height='([0-9.]+)'><title>[^:]+: (\d+)</title>", page)
    assert sum(int(count) for _, count in bars) == 1000  # every score is in the histogram, not only the shown
    assert "class='thr'" in page and "threshold 0.9000" in page
    # top=None shows every entry; without scores the histogram is drawn from the entries
    page = report.html_report(shown, title="t", top=None)
    assert page.count("class='card'") == 250 and "showing the" not in page
    assert sum(int(c) for c in re.findall(r"</?title>[^<:]*: (\d+)</title>", page)) == 250


def test_the_histogram_copes_with_one_value_and_with_nothing():
    assert "<svg" in report.score_histogram_svg([0.5, 0.5, 0.5])
    assert report.score_histogram_svg([]) == "" and report.score_histogram_svg([float("nan")]) == ""


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.62, 0.97, 1.0, 12345.678])
def test_the_threshold_label_stays_inside_the_histogram(threshold):
    width = 640
    svg = report.score_histogram_svg([0.0, 0.5, 1.0], threshold=threshold, width=width)
    [(x, anchor, text)] = re.findall(r"<text x='([-\d.]+)' y='11' text-anchor='(\w+)'>([^<]+)</text>", svg)
    # 11 px text: no glyph of these labels is wider than 7 px
    left, right = (
        (float(x), float(x) + 7 * len(text)) if anchor == "start" else (float(x) - 7 * len(text), float(x))
    )
    assert left >= 0 and right <= width, (left, right, text)
