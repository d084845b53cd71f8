"""`clipfusion predict` as a user runs it: the real branches (tiny random-weight preset) on synthetic
data. Random weights check the plumbing, never detection quality."""

import csv
import json
from pathlib import Path

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
    assert len(rows) == n
    assert list(rows[0]) == ["path", "score", "decision", "overlay", "map", "mask", "weights"]
    assert {r["decision"] for r in rows} <= {"normal", "anomalous"}
    # every row names the files written for its image (names collide across defect folders: 000.png …)
    for column in ("overlay", "map", "mask"):
        assert len({r[column] for r in rows}) == n and all((out / r[column]).is_file() for r in rows)
    assert {r["weights"] for r in rows} == {"random"}
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
    # the inputs left out, one (path, problem) row each, as a Ray run lists them
    with (tmp_path / "o" / "skipped.csv").open() as fh:
        skipped = list(csv.DictReader(fh))
    assert [Path(r["path"]).name for r in skipped] == ["empty.png", "text.jpg"]
    assert all(r["problem"].startswith(r["path"] + ": ") for r in skipped)
    assert "skipped.csv" in json.loads((tmp_path / "o" / "manifest.json").read_text())["files"]


def test_ray_options_need_the_ray_engine(tmp_path, capsys):
    for extra in (["--workers", "2"], ["--resume"], ["--address", "auto"], ["--gpus-per-worker", "1"]):
        argv = ["predict", str(tmp_path), "--object", "cap", "--preset", "tiny", "--out", str(tmp_path / "o")]
        assert main(argv + extra) == 2
        assert f"{extra[0]}: only with --engine ray" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _predict_args(small_root, out, *extra, images=None):
    test_dir = small_root / "bottle_cap" / "test"
    refs = sorted((small_root / "bottle_cap" / "train" / "good").iterdir())[:2]
    inputs = images if images is not None else [test_dir]
    return [
        "predict",
        *map(str, inputs),
        "--object",
        "bottle cap",
        "--refs",
        *map(str, refs),
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_a_second_run_into_the_same_folder_is_refused_unless_overwritten(small_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_predict_args(small_root, out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["weights"] == "random"
    assert sorted(manifest["files"]) == sorted(
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    (out / "notes.txt").write_text("mine")  # a file of the user's, not of the run
    capsys.readouterr()
    one_image = [next((small_root / "bottle_cap" / "test" / "good").iterdir())]
    assert main(_predict_args(small_root, out, images=one_image)) == 2
    err = capsys.readouterr().err
    assert "holds an earlier clipfusion run" in err and "--overwrite" in err and "Traceback" not in err
    assert len(list((out / "overlays").glob("*.png"))) > 1  # untouched
    assert main(_predict_args(small_root, out, "--overwrite", images=one_image)) == 0
    # the earlier run's files are gone, the user's file is not: nothing stale mixes with the new scores
    assert len(list((out / "overlays").glob("*.png"))) == len(list((out / "maps").glob("*.npy"))) == 1
    assert (out / "notes.txt").read_text() == "mine"
    with (out / "scores.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 1
    # a non-empty folder that is not a clipfusion run is refused, even with --overwrite
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    assert main(_predict_args(small_root, foreign, "--overwrite", images=one_image)) == 2
    assert "holds no clipfusion run" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preset", "paper"], "clipfusion weights fetch"),  # no weights on this machine
        (["--dtype", "float16"], "float16 is only supported on CUDA"),
        (["--device", "cuda"], "no usable CUDA device"),
    ],
)
def test_a_run_that_fails_after_the_checks_leaves_no_output_folder(
    small_root, tmp_path, capsys, extra, message
):
    import torch

    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "new" / "run"
    argv = _predict_args(small_root, out, images=[next((small_root / "bottle_cap/test/good").iterdir())])
    assert main([*argv, *extra]) == 2  # a later --preset wins over the helper's --preset tiny
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()


def test_missing_weights_name_the_three_ways_out(small_root, tmp_path, capsys):
    argv = _predict_args(
        small_root, tmp_path / "o", images=[next((small_root / "bottle_cap/test/good").iterdir())]
    )
    argv.remove("tiny")
    argv.remove("--preset")  # the default preset: paper, whose weights this machine does not have
    assert main(argv) == 2
    err = capsys.readouterr().err
    for way in ("clipfusion weights fetch", "--weights-dir DIR", "--preset tiny"):
        assert way in err, way
    assert "Traceback" not in err


def test_calibrated_thresholds_are_saved_and_reused(small_root, tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in sorted((small_root / "bottle_cap/train/good").iterdir())[2:]:
        (calib / p.name).write_bytes(p.read_bytes())
    first = tmp_path / "first"
    assert main(_predict_args(small_root, first, "--calibrate", str(calib), "--quantile", "0.9")) == 0
    saved = json.loads((first / "thresholds.json").read_text())
    assert saved["quantile"] == 0.9 and saved["n_images"] == 2 and saved["object_name"] == "bottle cap"
    assert saved["config"]["preset"] == "tiny" and len(saved["files"]) == 2
    # reused: the same decisions without the calibration images
    second = tmp_path / "second"
    assert main(_predict_args(small_root, second, "--thresholds", str(first / "thresholds.json"))) == 0
    assert (second / "scores.csv").read_text() == (first / "scores.csv").read_text()
    assert json.loads((second / "thresholds.json").read_text())["image"] == saved["image"]
    # refused for another configuration, and for other references
    capsys.readouterr()
    other = _predict_args(small_root, tmp_path / "third", "--thresholds", str(first / "thresholds.json"))
    assert main([*other, "--set", "alpha_map=0.5"]) == 2
    assert "calibrated for another configuration (differs in alpha_map)" in capsys.readouterr().err
    assert not (tmp_path / "third").exists()
    refs = sorted((small_root / "bottle_cap/train/good").iterdir())
    other = _predict_args(small_root, tmp_path / "fourth", "--thresholds", str(first / "thresholds.json"))
    other[other.index("--refs") + 1] = str(refs[3])
    assert main(other) == 2
    assert "calibrated with other reference images" in capsys.readouterr().err


def test_every_phase_says_what_it_does_and_verbosity_is_chosen(small_root, tmp_path, capsys):
    one = [next((small_root / "bottle_cap/test/good").iterdir())]
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in sorted((small_root / "bottle_cap/train/good").iterdir())[2:]:
        (calib / p.name).write_bytes(p.read_bytes())
    argv = _predict_args(small_root, tmp_path / "a", "--calibrate", str(calib), images=one)
    argv.remove("--no-progress")
    assert main(argv) == 0
    err = capsys.readouterr().err
    for phase in (
        "loading the models",
        "fitting to 'bottle cap'",
        "calibrating on 2 normal images",
        "scoring 1 images",
        "writing overlays",
        "PIPELINE DEMONSTRATION",
    ):
        assert phase in err, phase
    assert "calibrate: " in err  # the calibration's own progress bar, not "predict"
    # -q: warnings and errors only, no progress; --log FILE: everything, with debug lines
    log_file = tmp_path / "logs" / "run.log"
    argv = _predict_args(small_root, tmp_path / "b", "-q", "--log", str(log_file), images=one)
    argv.remove("--no-progress")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "loading the models" not in err and "predict:" not in err
    assert "warning: PIPELINE DEMONSTRATION" in err
    logged = log_file.read_text()
    assert "loading the models" in logged and "writing overlays" in logged and "DEBUG" in logged
    # -v: debug lines on the console too
    assert main(_predict_args(small_root, tmp_path / "c", "-v", images=one)) == 0
    assert "debug: clipfusion.detector: fitted to 'bottle cap'" in capsys.readouterr().err
