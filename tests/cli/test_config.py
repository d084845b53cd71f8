"""`clipfusion config`: the options, and what their "auto" placement becomes on this machine."""

import json

from clipfusion.cli import main
from clipfusion.config import load_config
from clipfusion.runtime import auto_dtype, dtype_name


def test_config_shows_auto_and_what_it_resolves_to(capsys):
    assert main(["config", "--preset", "random-full", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dtype"] == "auto"
    resolved = dtype_name(auto_dtype("cpu"))
    assert printed["resolved"]["clip"] == {"device": "cpu", "dtype": resolved}
    assert printed["resolved"]["auto_dtype"].endswith(resolved)


def test_config_for_a_missing_device_still_prints(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert main(["config", "--preset", "paper", "--device", "cuda"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "no usable CUDA device" in printed["resolved"]["unavailable"]


def test_saved_config_keeps_auto_for_reuse(tmp_path, capsys):
    path = tmp_path / "mine.toml"
    assert main(["config", "--preset", "paper", "--save", str(path)]) == 0
    assert "resolved" not in path.read_text() and load_config(path).dtype == "auto"
    assert "on this machine" in capsys.readouterr().err
