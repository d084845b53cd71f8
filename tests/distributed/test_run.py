"""The driver's checks, before Ray starts or any model loads (no Ray instance needed)."""

import json

import pytest

from clipfusion import distributed
from clipfusion.cli import main
from clipfusion.distributed.run import PATTERNS, RunFolder
from clipfusion.errors import ConfigError, InputError
from clipfusion.outputs.folders import OutputFolder


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": 0}, "--workers must be a positive integer"),
        ({"gpus_per_worker": -1}, "--gpus-per-worker must be 0 or more"),
        ({"cpus_per_worker": 0}, "--cpus-per-worker must be positive"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"normalize": "global"}, "--normalize must be one of set, image"),
        ({"report_top": 0}, "--report-top must be at least 1"),
        ({"resume": True, "overwrite": True}, "either --resume or --overwrite"),
        ({"out": "s3://bucket/run"}, "URLs are not supported"),
    ],
)
def test_options_are_refused_in_one_line_before_any_work(tmp_path, options, message):
    out = options.pop("out", tmp_path / "out")
    with pytest.raises(ConfigError, match=message):
        distributed.predict(tmp_path / "no-fit", [tmp_path], out, **options)
    assert not (tmp_path / "out").exists()


def test_a_missing_fit_is_named_before_ray_starts(tmp_path):
    with pytest.raises(InputError, match="no-fit: no such folder"):
        distributed.predict(tmp_path / "no-fit", [tmp_path], tmp_path / "out")


def test_resume_continues_only_a_ray_run_of_the_same_settings(tmp_path):
    run = {"fitted": "abc", "threshold": 0.5, "pixel_threshold": None, "normalize": "set"}
    first = RunFolder(tmp_path / "out")
    assert first.open_run(run, ["scores.csv"], images=3) is False
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["engine"] == "ray" and manifest["patterns"] == list(PATTERNS) and not manifest["complete"]
    # without --resume: refused, named as the interrupted run it is, with the way to continue it
    with pytest.raises(
        InputError, match=r"holds an interrupted clipfusion run \(0 of 3 images scored.*--resume"
    ):
        RunFolder(tmp_path / "out").check(run)
    again = RunFolder(tmp_path / "out", resume=True)
    again.check(run)
    assert again.open_run(run, ["scores.csv", "thresholds.json"], images=4) is True
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["images"] == 4 and "resumed" in manifest and "thresholds.json" in manifest["files"]
    with pytest.raises(InputError, match="the earlier run used another normalize, threshold; --resume"):
        RunFolder(tmp_path / "out", resume=True).check({**run, "threshold": 0.6, "normalize": "image"})
    local = OutputFolder(tmp_path / "local")
    local.open(["scores.csv"], command="predict")
    with pytest.raises(InputError, match="holds a run of the local engine"):
        RunFolder(tmp_path / "local", resume=True).check(run)
    # --resume into a new folder simply starts the run
    RunFolder(tmp_path / "new", resume=True).check(run)


def test_a_run_that_could_not_start_leaves_no_folder(tmp_path):
    folder = RunFolder(tmp_path / "a" / "out")
    folder.open_run({"fitted": "x"}, ["scores.csv"])
    (tmp_path / "a" / "out" / ".clipfusion-parts").mkdir()
    folder.abandon()
    assert not (tmp_path / "a" / "out").exists() and (tmp_path / "a").is_dir()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--engine ray scores with a saved fit: give --fitted DIR"),
        (["--fitted", "F", "--calibrate", "C"], "--calibrate does not run on --engine ray"),
        (["--fitted", "F", "--object", "cap"], "drop --object"),
    ],
)
def test_the_cli_refuses_what_the_ray_engine_does_not_do(tmp_path, capsys, extra, message):
    argv = ["predict", str(tmp_path), "--engine", "ray", "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
