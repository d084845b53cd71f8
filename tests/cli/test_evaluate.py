"""`clipfusion evaluate` as a user runs it: the real branches (tiny random-weight preset) on synthetic
data, resumed after an interruption. Random weights check the plumbing, never detection quality."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clipfusion.cli import main


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    from clipfusion.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("e2e")
    return make_synthetic_dataset(
        root, categories=["woven_fabric", "bottle_cap"], n_train=4, n_test=10, image_size=128, seed=1
    )


def test_evaluate_writes_results_and_localises_obvious_defects(small_root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "evaluate",
        "--dataset",
        "folder",
        "--root",
        str(small_root),
        "--shots",
        "0",
        "2",
        "--seeds",
        "0",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "PIPELINE DEMONSTRATION" in captured.err
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["category"], r["shots"]) for r in rows} == {
        ("woven_fabric", "0"),
        ("woven_fabric", "2"),
        ("bottle_cap", "0"),
        ("bottle_cap", "2"),
    }
    for row in rows:
        values = [float(row[c]) for c in row if c not in ("category", "shots", "seed", "weights")]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert row["weights"] == "random"  # the tiny preset: metrics of the pipeline, not of the method
    # plumbing check with random weights: the memory-bank maps find obvious synthetic defects
    few = [float(r["pixel_auroc"]) for r in rows if r["shots"] == "2"]
    assert min(few) >= 0.9, few
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["preset"] == "tiny"
    assert all(len(run["references"]) == 2 for run in data["runs"] if run["shots"] == 2)
    assert "random-weight" in (out / "summary.md").read_text()

    # --resume: everything is done, nothing is recomputed, the files stay identical
    before = (out / "results.csv").read_text()
    assert main([*argv, "--resume"]) == 0
    assert "4 of 4 runs already done" in capsys.readouterr().err
    assert (out / "results.csv").read_text() == before


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_evaluation_resumes_to_the_same_results(tmp_path, capsys):
    from clipfusion.data import make_synthetic_dataset

    root = make_synthetic_dataset(
        tmp_path / "data",
        categories=["woven_fabric", "grainy_leather", "bottle_cap"],
        n_train=2,
        n_test=6,
        image_size=64,
        seed=2,
    )
    args = [
        "evaluate",
        "--dataset",
        "folder",
        "--root",
        str(root),
        "--shots",
        "1",
        "--seeds",
        "0",
        "1",
        "--preset",
        "tiny",
        "--no-progress",
    ]

    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipfusion", *args, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            results = out / "results.json"
            if results.exists() and len(json.loads(results.read_text())["runs"]) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail("the evaluation finished before it could be interrupted")
            time.sleep(0.05)
        else:
            pytest.fail("no run finished in time")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done_before = len(json.loads((out / "results.json").read_text())["runs"])
    assert 2 <= done_before < 6
    # whatever the moment of the kill, the files are whole: the CSV has a line per run in the JSON
    assert len((out / "results.csv").read_text().splitlines()) == done_before + 1

    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert f"{done_before} of 6 runs already done" in capsys.readouterr().err
    assert (out / "results.csv").read_text() == (tmp_path / "whole" / "results.csv").read_text()


def test_ctrl_c_says_the_finished_runs_are_kept_and_how_to_go_on(tmp_path, capsys, monkeypatch):
    import clipfusion.evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(clipfusion.evaluation, "evaluate", interrupted)
    argv = ["evaluate", "--dataset", "folder", "--root", str(tmp_path), "--preset", "tiny"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 130
    [line] = [x for x in capsys.readouterr().err.splitlines() if "interrupted" in x]
    assert line == (
        f"clipfusion: error: interrupted: every finished run is saved in {tmp_path / 'out'}; add --resume to "
        "continue it"
    )
