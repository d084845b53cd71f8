"""`clipfusion predict` as a user runs it: the real branches (tiny random-weight preset) on synthetic
data. Random weights check the plumbing, never detection quality."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from clipfusion.cli import main


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    from clipfusion.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("e2e")
    return make_synthetic_dataset(
        root, categories=["woven_fabric", "bottle_cap"], n_train=4, n_test=10, image_size=128, seed=1
    )


def test_predict_on_a_folder_writes_scores_overlays_maps_and_report(small_root, tmp_path, capsys):
    test_dir = small_root / "bottle_cap" / "test"
    refs = small_root / "bottle_cap" / "train" / "good"
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in sorted(refs.iterdir())[2:]:
        (calib / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "pred"
    argv = [
        "predict",
        str(test_dir),
        "--object",
        "bottle cap",
        "--refs",
        *map(str, sorted(refs.iterdir())[:2]),
        "--calibrate",
        str(calib),
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    n = len(list(test_dir.rglob("*.png")))
    with (out / "scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n and set(rows[0]) == {"path", "score", "decision"}
    assert {r["decision"] for r in rows} <= {"normal", "anomalous"}
    assert len(list((out / "overlays").glob("*.png"))) == n
    assert len(list((out / "masks").glob("*.png"))) == n
    maps = sorted((out / "maps").glob("*.npy"))
    assert len(maps) == n and np.load(maps[0]).dtype == np.float32
    page = (out / "report.html").read_text()
    assert page.count("class='card'") == n and "PIPELINE DEMONSTRATION" in page
    assert json.loads((out / "config.json").read_text())["preset"] == "tiny"
    with Image.open(next((out / "overlays").glob("*.png"))) as overlay:
        assert overlay.size == (128, 128)


def test_predict_reports_every_bad_input_at_once_without_traceback(small_root, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    good = next((small_root / "bottle_cap" / "test" / "good").iterdir())
    argv = [
        "predict",
        str(bad),
        str(good),
        str(tmp_path / "missing.png"),
        "--object",
        "cap",
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "missing.png: no such file" in err and "empty.png" in err and "text.jpg" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()
    # --skip-bad continues (the missing path is still an error: it is not an image that failed to read)
    argv = [
        "predict",
        str(bad),
        str(good),
        "--object",
        "cap",
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "o"),
        "--skip-bad",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "empty.png" in (tmp_path / "o" / "report.html").read_text()
    with (tmp_path / "o" / "scores.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 1
