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
    # the output names mirror the inputs' folders (test/good/000.png → overlays/good/000.png), no "_2"
    for r in rows:
        rel = Path(r["path"]).relative_to(test_dir).with_suffix("")
        assert (r["overlay"], r["map"], r["mask"]) == (
            f"overlays/{rel}.png",
            f"maps/{rel}.npy",
            f"masks/{rel}.png",
        )
    assert len(list((out / "overlays").rglob("*.png"))) == n
    assert len(list((out / "masks").rglob("*.png"))) == n
    maps = sorted((out / "maps").rglob("*.npy"))
    assert len(maps) == n and np.load(maps[0]).dtype == np.float32
    page = (out / "report.html").read_text()
    assert page.count("class='card'") == n and "PIPELINE DEMONSTRATION" in page
    assert json.loads((out / "config.json").read_text())["preset"] == "tiny"
    with Image.open(next((out / "overlays").rglob("*.png"))) as overlay:
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
    # (--resume is not among them: a local run resumes too)
    for extra in (["--workers", "2"], ["--address", "auto"], ["--gpus-per-worker", "1"]):
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
    assert len(list((out / "overlays").rglob("*.png"))) > 1  # untouched
    assert main(_predict_args(small_root, out, "--overwrite", images=one_image)) == 0
    # the earlier run's files are gone, the user's file is not: nothing stale mixes with the new scores
    assert len(list((out / "overlays").rglob("*.png"))) == len(list((out / "maps").rglob("*.npy"))) == 1
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
    # found out before any image is checked or model loaded, not after the hub client gives up
    assert "loading the models" not in err and "not on this machine (missing clip" in err


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
    # one style of path in the file: the calibration images absolute, as the references
    assert saved["origin"] == "calibration"
    assert all(Path(f).is_absolute() for f in saved["files"] + saved["references"])
    # an image threshold given by hand: the file says so, and keeps the calibrated pixel value as it was
    hand = tmp_path / "hand"
    argv = _predict_args(
        small_root, hand, "--calibrate", str(calib), "--quantile", "0.9", "--threshold", "0.5"
    )
    assert main(argv) == 0
    by_hand = json.loads((hand / "thresholds.json").read_text())
    assert by_hand["origin"] == "set by hand" and by_hand["set_by_hand"] == ["image"]
    assert by_hand["image"] == 0.5 and by_hand["pixel"] == saved["pixel"] and "quantile" not in by_hand
    assert by_hand["set_from"]["image"] == saved["image"] and by_hand["set_from"]["quantile"] == 0.9
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
    err = capsys.readouterr().err
    assert "calibrated with other reference images" in err
    assert "loading the models" not in err  # refused before any model loads
    other = _predict_args(small_root, tmp_path / "fifth", "--thresholds", str(first / "thresholds.json"))
    other[other.index("--object") + 1] = "metal nut"
    assert main(other) == 2
    err = capsys.readouterr().err
    assert (
        "calibrated for the object 'bottle cap', not 'metal nut'" in err and "loading the models" not in err
    )


def test_calibrating_on_the_references_themselves_is_refused_naming_the_overlap(small_root, tmp_path, capsys):
    good = small_root / "bottle_cap/train/good"
    refs = sorted(good.iterdir())
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "copy.png").write_bytes(refs[0].read_bytes())  # the same image under another name
    (calib / "other.png").write_bytes(refs[3].read_bytes())
    for calibration, shown in ((good, f"{refs[0]}"), (calib, f"{calib / 'copy.png'} = {refs[0]}")):
        argv = _predict_args(small_root, tmp_path / "o", "--calibrate", str(calibration))
        assert main(argv) == 2
        [line] = [x for x in capsys.readouterr().err.splitlines() if "--calibrate" in x]
        assert "calibration images are references too" in line and shown in line
    assert not (tmp_path / "o").exists()


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


def _photos(small_root, folder, n=3):
    folder.mkdir()
    for i, p in enumerate(sorted((small_root / "bottle_cap" / "test" / "good").iterdir())[:n]):
        (folder / f"photo_{i}.png").write_bytes(p.read_bytes())
    return folder


def _scored(out):
    with (out / "scores.csv").open() as fh:
        return [row["path"] for row in csv.DictReader(fh)]


def test_a_runs_outputs_inside_the_input_folder_are_never_read_back_as_inputs(small_root, tmp_path, capsys):
    photos = _photos(small_root, tmp_path / "photos")
    args = ["predict", str(photos), "--object", "cap", "--preset", "tiny", "--no-progress"]
    assert main([*args, "--out", str(photos / "results")]) == 0
    first = _scored(photos / "results")
    assert len(first) == 3
    capsys.readouterr()
    # again into the same folder: the walk skips the folder it is about to replace, so nothing is deleted
    # before the inputs are known and the earlier overlays are not "photos"
    assert main([*args, "--out", str(photos / "results"), "--overwrite"]) == 0
    assert _scored(photos / "results") == first
    assert "left out 1 folder of clipfusion outputs" in capsys.readouterr().err
    # into a fresh folder: the earlier run (its manifest.json) is left out too, and said so
    assert main([*args, "--out", str(photos / "results2")]) == 0
    assert _scored(photos / "results2") == first
    err = capsys.readouterr().err
    assert "left out 1 folder of clipfusion outputs" in err and str(photos / "results") in err
    # a file named inside the folder the run replaces is refused before anything is deleted
    overlay = next((photos / "results" / "overlays").rglob("*.png"))
    assert main([*args[:1], str(overlay), *args[2:], "--out", str(photos / "results"), "--overwrite"]) == 2
    assert "inside this run's output folder" in capsys.readouterr().err
    assert overlay.is_file() and _scored(photos / "results") == first


def test_ctrl_c_says_where_it_stopped_and_resume_finishes_the_run_as_if_never_stopped(
    small_root, tmp_path, capsys, monkeypatch
):
    from clipfusion.detector import CLIPFusion

    photos = _photos(small_root, tmp_path / "photos", n=5)
    args = [
        "predict",
        str(photos),
        "--object",
        "cap",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    whole = tmp_path / "whole"
    assert main([*args, "--out", str(whole)]) == 0
    real, calls, stop = CLIPFusion.predict, [], [True]

    def stopped_at_the_second_batch(self, images, **kwargs):
        calls.append(len(images))
        if len(calls) == 2 and stop[0]:
            raise KeyboardInterrupt
        return real(self, images, **kwargs)

    monkeypatch.setattr(CLIPFusion, "predict", stopped_at_the_second_batch)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 130
    [line] = [x for x in capsys.readouterr().err.splitlines() if "interrupted" in x]
    assert line == (
        f"clipfusion: error: interrupted (scoring 5 images): 2 of 5 images scored, kept in {out} "
        "(manifest.json marks the run interrupted); run the same command with --resume to continue it"
    )
    # a re-run names the folder as the interrupted run it is
    assert main([*args, "--out", str(out)]) == 2
    assert "holds an interrupted clipfusion run (2 of 5 images scored" in capsys.readouterr().err
    # another setting is refused; the same command with --resume scores only the missing batches
    assert main([*args, "--out", str(out), "--resume", "--threshold", "0.5"]) == 2
    assert "the earlier run used another threshold" in capsys.readouterr().err
    calls.clear()
    stop[0] = False
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert calls == [2, 1] and "resuming: 2 of 5 images already scored" in capsys.readouterr().err
    mine = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    theirs = {str(p.relative_to(whole)): p.read_bytes() for p in whole.rglob("*") if p.is_file()}
    skip = ("manifest.json", "report.html", ".clipfusion-parts/scores.jsonl")  # times, and the records
    assert {k: v for k, v in mine.items() if k not in skip} == {
        k: v for k, v in theirs.items() if k not in skip
    }
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


def test_no_bar_for_work_not_asked_for_and_an_error_starts_its_own_line(
    small_root, tmp_path, capsys, monkeypatch
):
    from clipfusion.outputs import report

    def disk_full(array, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(report, "save_npy", disk_full)
    photos = _photos(small_root, tmp_path / "photos")
    # progress bars on (the default): zero-shot has no references, so no "checking references" bar
    assert (
        main(["predict", str(photos), "--object", "cap", "--preset", "tiny", "--out", str(tmp_path / "o")])
        == 1
    )
    err = capsys.readouterr().err
    assert "checking images" in err and "checking references" not in err and "calibration" not in err
    assert "No space left on device" in err
    for line in err.split("\n"):
        if "clipfusion: error:" in line:
            assert line.startswith("clipfusion: error:"), repr(line)
