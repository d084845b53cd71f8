import base64
import io
import re

import numpy as np
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
