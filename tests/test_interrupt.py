"""An evaluation killed mid-run (SIGKILL: no cleanup at all) and resumed gives the same results.csv as an
uninterrupted one, and never leaves a truncated result file behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clipfusion.cli import main


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
