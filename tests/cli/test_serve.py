"""`clipfusion serve`: what is refused before a port is opened or a model loaded (model-free fitted folders
from the fake branches; the running server is tested in tests/serve/)."""

from __future__ import annotations

import socket

import pytest
from PIL import Image

from clipfusion.cli import main
from fabricate import random_rgb
from fakes import fake_detector

pytest.importorskip("fastapi", reason="clipfusion serve needs the serve extra")


@pytest.fixture(scope="module")
def fitted_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cli")
    det = fake_detector().fit("bottle", [Image.fromarray(random_rgb(0, (32, 32)))])
    return det.save(root / "bottle")


def _run(capsys, *args):
    code = main(["serve", *args, "--no-progress"])
    return code, capsys.readouterr().err


def test_serve_is_a_command():
    from clipfusion.cli import build_parser

    help_text = build_parser().format_help()
    assert "serve" in help_text


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_listening_beyond_this_machine_needs_a_token(fitted_dir, capsys, monkeypatch, host):
    monkeypatch.delenv("CLIPFUSION_SERVE_TOKEN", raising=False)
    code, err = _run(capsys, "--fitted", str(fitted_dir), "--host", host)
    assert code == 2
    assert f"--host {host} makes the server reachable from other machines: give --token TOKEN" in err
    assert len(err.strip().splitlines()) == 1


def test_the_token_may_come_from_the_environment(fitted_dir, capsys, monkeypatch):
    monkeypatch.setenv("CLIPFUSION_SERVE_TOKEN", "an-environment-token-1234")
    with socket.socket() as taken:  # the token passes; the port, taken, is then refused before loading
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _run(capsys, "--fitted", str(fitted_dir), "--host", "0.0.0.0", "--port", str(port))
    assert code == 2
    assert "token" not in err
    assert f"--host 0.0.0.0 --port {port}: cannot listen there" in err


def test_a_short_token_is_refused(fitted_dir, capsys):
    code, err = _run(capsys, "--fitted", str(fitted_dir), "--token", "short")
    assert code == 2
    assert "--token must be at least 16 characters" in err


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d, t: ["--fitted", str(t / "missing")], "missing: no such folder"),
        (lambda d, t: ["--fitted", str(t)], "not a fitted clipfusion detector"),
        (lambda d, t: ["--fitted", str(d), f"bottle={d}"], "two detectors named 'bottle'"),
        (lambda d, t: ["--fitted", f"my cap={d}"], "'my cap' is not a usable detector name"),
        (lambda d, t: ["--fitted", str(d), "--max-queue", "0"], "--max-queue must be at least 1"),
        (lambda d, t: ["--fitted", str(d), "--max-upload-mb", "0"], "--max-upload-mb must lie in"),
        (lambda d, t: ["--fitted", str(d), "--batch-size", "0"], "--batch-size must be at least 1"),
        (lambda d, t: ["--fitted", str(d), "--port", "70000"], "--port must lie in 0..65535"),
    ],
)
def test_bad_options_and_folders_exit_2_with_one_line(fitted_dir, tmp_path, capsys, make_args, message):
    code, err = _run(capsys, *make_args(fitted_dir, tmp_path))
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_detectors_are_named_after_their_folder_or_by_name(fitted_dir):
    from clipfusion.serve.pool import parse_fitted

    named = parse_fitted([str(fitted_dir), f"other={fitted_dir}"])
    assert named == {"bottle": fitted_dir, "other": fitted_dir}


@pytest.mark.slow
def test_a_detector_that_cannot_be_loaded_stops_the_server_with_exit_2(fitted_dir, tmp_path):
    """The folder is well-formed, but its fit was made with other weights (the fake branches'): the server
    starts, the background load refuses the weights, and the command ends with one line and status 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import clipfusion

    env = dict(os.environ, PYTHONPATH=str(Path(clipfusion.__file__).resolve().parents[1]))
    done = subprocess.run(
        [sys.executable, "-m", "clipfusion", "serve", "--fitted", str(fitted_dir), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("clipfusion: error:")]
    assert len(errors) == 2  # the log line when it happened, and the command's closing line
    assert errors[-1].startswith("clipfusion: error: detector 'bottle' could not be loaded: ")
    assert "are not the ones the detector was fitted with" in errors[-1]
    assert "Traceback" not in done.stderr
