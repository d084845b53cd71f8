"""The Ray worker's code as plain Python: records per image, outputs written atomically, and data that
never makes a task fail. A stand-in detector keeps it model-free (the Ray tests run the real one)."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
from PIL import Image

from clipfusion.distributed.worker import FAILED, OK, SKIPPED, ScoreBatch, draw_overlays
from fabricate import random_rgb, save_image


class StubDetector:
    """Maps filled with the image's mean; an image whose top-left pixel is pure red raises."""

    def __init__(self):
        self.calls = []

    def predict(self, images, batch_size=None):
        self.calls.append(len(images))
        out = []
        for image in images:
            if image.getpixel((0, 0)) == (255, 0, 0):
                raise RuntimeError("boom")
            value = float(np.float32(np.asarray(image).mean() / 255.0))
            out.append(SimpleNamespace(score=value, anomaly_map=np.full((8, 8), value, np.float32)))
        return out


def _worker(out, **options):
    worker = ScoreBatch.__new__(
        ScoreBatch
    )  # the constructor loads a fitted detector; the rest is tested here
    worker.__dict__.update(
        detector=StubDetector(),
        out=out,
        threads=2,
        batch_size=4,
        pixel_threshold=options.get("pixel_threshold"),
        overlays=options.get("overlays", False),
        png_text={"clipfusion-weights": "random"},
        name="host:1",
    )
    return worker


def _batch(paths, masks=True):
    rows = []
    for i, path in enumerate(paths):
        # the path as the user gave it (what every message names) and the absolute one a worker opens
        row = {"index": i, "path": f"given/{path.name}", "source": str(path), "map": f"maps/{i}.npy"}
        row.update(overlay=f"overlays/{i}.png", **({"mask": f"masks/{i}.png"} if masks else {}))
        rows.append(row)
    return pa.Table.from_pylist(rows)


def test_a_batch_with_a_bad_file_and_a_failing_image_still_scores_the_rest(tmp_path):
    good = [save_image(tmp_path / f"g{i}.png", random_rgb(i, (40, 36))) for i in range(2)]
    red = np.zeros((40, 40, 3), np.uint8)
    red[0, 0] = (255, 0, 0)
    failing = save_image(tmp_path / "red.png", red)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    out = tmp_path / "out"
    worker = _worker(out, pixel_threshold=0.5, overlays=True)
    records = worker(_batch([good[0], bad, failing, good[1]])).to_pylist()

    assert [r["status"] for r in records] == [OK, SKIPPED, FAILED, OK]
    assert records[1]["problem"].startswith("given/bad.png: not an image file")
    assert records[2]["problem"] == "given/red.png: RuntimeError: boom"
    assert worker.detector.calls == [3, 1, 1, 1]  # the batch failed, then each image alone
    for i in (0, 3):
        saved = np.load(out / f"maps/{i}.npy")
        assert saved.dtype == np.float32 and records[i]["score"] == float(saved[0, 0])
        assert records[i]["map_min"] == records[i]["map_max"] == float(saved[0, 0])
        with Image.open(out / f"masks/{i}.png") as mask, Image.open(out / f"overlays/{i}.png") as overlay:
            assert mask.size == overlay.size == (40, 36) and overlay.text["clipfusion-weights"] == "random"
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["0.npy", "3.npy"]  # no temporary left


def test_an_output_that_cannot_be_written_fails_that_image_not_the_task(tmp_path):
    image = save_image(tmp_path / "a.png", random_rgb(3, (40, 40)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "maps").write_text("a file where the maps folder should be")
    records = _worker(out)(_batch([image], masks=False)).to_pylist()
    assert records[0]["status"] == FAILED and "cannot write its outputs" in records[0]["problem"]


def test_the_overlay_pass_draws_on_the_given_scale_and_records_a_vanished_image(tmp_path):
    image = save_image(tmp_path / "a.png", random_rgb(1, (32, 32)))
    out = tmp_path / "out"
    (out / "maps").mkdir(parents=True)
    np.save(out / "maps" / "0.npy", np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    np.save(out / "maps" / "1.npy", np.zeros((8, 8), np.float32))
    batch = _batch([image, tmp_path / "gone.png"], masks=False)
    records = draw_overlays(batch, out=str(out), vmin=0.0, vmax=2.0, png_text={}).to_pylist()
    assert [r["status"] for r in records] == [OK, FAILED]
    assert records[1]["problem"] == "given/gone.png: file not found"
    assert (records[0]["vmin"], records[0]["vmax"]) == (0.0, 2.0)
    with Image.open(out / "overlays" / "0.png") as drawn:
        assert drawn.size == (32, 32)


def test_a_worker_removes_the_fit_copies_that_killed_workers_left_and_its_own(tmp_path, monkeypatch):
    import socket
    import tempfile

    import pytest

    from clipfusion.errors import ClipfusionError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # a worker killed while loading (pid 2**22 + 1: above any Linux pid_max) left its copy of the fit
    left = tmp_path / f"clipfusion-fitted-{2**22 + 1}-abcd-{socket.gethostname()}"
    left.mkdir()
    (left / "detector.json").write_text("{}")
    with pytest.raises(ClipfusionError, match="not a fitted clipfusion detector"):
        ScoreBatch({"detector.json": b"{}"}, out=str(tmp_path / "out"), fitted_path="the fitted detector")
    assert list(tmp_path.glob("clipfusion-fitted-*")) == []
