"""The README stays true: its Python example runs, every command-line option it names exists, and the quick
start says what the first install costs."""

import re
from pathlib import Path

import numpy as np
from PIL import Image

from clipfusion.cli import _leaf_parsers, build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(after_heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(after_heading) :]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


def test_the_python_api_example_runs(tmp_path, monkeypatch):
    code = _python_block("## Python API")
    weights = tmp_path / "weights"
    weights.mkdir()
    # the same calls on the tiny random models (the pretrained ones are not on this machine)
    code = code.replace('from_preset("paper"', 'from_preset("tiny"').replace(
        "/data/clipfusion-weights", str(weights)
    )
    rng = np.random.default_rng(0)
    for name in (
        "good/000.png",
        "good/001.png",
        "test/a.png",
        "test/b.png",
        "normal/000.png",
        "normal/001.png",
    ):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["r"].anomaly_map.shape == (64, 64) and (tmp_path / "thresholds.json").is_file()
    assert (tmp_path / "run.toml").is_file()


def test_every_option_the_readme_names_exists():
    import argparse

    from benchmarks.settings import add_arguments

    harness = argparse.ArgumentParser()  # the benchmark scripts (`clipfusion bench` is a leaf parser)
    add_arguments(harness)
    options = set()
    for parser in [build_parser(), *_leaf_parsers(build_parser()), harness]:
        for action in parser._actions:
            options.update(action.option_strings)
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", README.read_text(encoding="utf-8")))
    # options of other programs the README quotes
    foreign = {"--index-url", "--model", "--data", "--address", "--head"}
    missing = sorted(o for o in named - options if not any(o.startswith(f) for f in foreign))
    assert not missing, missing


def test_the_quick_start_says_what_the_first_install_costs():
    quick = README.read_text(encoding="utf-8").split("## Quick start")[1].split("\n## ")[0]
    assert "CUDA build, about 6 GB" in quick
    assert (
        'TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"'
        in quick
    )
    assert "12 minutes" in quick


def test_the_many_products_example_runs(tmp_path, monkeypatch):
    from clipfusion.detector import CLIPFusion

    code = _python_block("Many products on one copy of the models").replace(
        'load_preset("paper")', 'load_preset("tiny")'
    )
    rng = np.random.default_rng(1)
    for name in ("good/000.png", "test/a.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    for name in ("bottle", "cable"):
        CLIPFusion.from_preset("tiny").fit(name, ["good/000.png"]).save(f"fitted/{name}")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["line"].models) == 1 and scope["cable"].object_name == "cable"
    assert (tmp_path / "refit" / "bottle" / "detector.json").is_file()


def test_make_demo_installs_what_the_demo_needs_and_the_readme_says_the_sizes_and_chromium():
    makefile = (README.parent / "Makefile").read_text(encoding="utf-8")
    demo_stamp = makefile.split("$(DEMO_STAMP): pyproject.toml")[1].split("\n\n")[0]
    assert "-e ." in demo_stamp and "[test]" not in demo_stamp  # not anomalib, Lightning, Ray, Playwright
    assert "demo: $(DEMO_STAMP)" in makefile and "test: $(STAMP)" in makefile
    quick = README.read_text(encoding="utf-8").split("## Quick start")[1].split("\n## ")[0]
    assert "6.3 GB" in quick and "7.5 GB" in quick  # the .venv each target makes
    assert "apt-get install chromium" in quick and "CLIPFUSION_CHROMIUM" in quick
