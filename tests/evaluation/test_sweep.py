"""`clipfusion sweep` on maps stored by `evaluate --save-maps`, with model-free fake branches (exact and
fast): every grid point equals a separate evaluation, the outputs are complete, bad input is a clear error.
The same with the tiny real branches (and on a grid over diffusion options) is in test_grid.py."""

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from clipfusion.config import load_preset
from clipfusion.detector import CLIPFusion
from clipfusion.errors import ConfigError, InputError
from clipfusion.evaluation import evaluate
from clipfusion.evaluation.gridspec import apply_point, grid_points
from clipfusion.evaluation.results import METRIC_COLUMNS
from clipfusion.evaluation.sweep import sweep
from fakes import FakeBranch

CATEGORIES = ["woven_fabric", "bottle_cap"]


def _factory(calls=None):
    def build(config):
        if calls is not None:
            calls.append(config)
        # the fakes' native grid (24) differs from the output size (32): the fusion resizes, as with real maps
        return CLIPFusion(config, clip=FakeBranch("clip", 24), diffusion=FakeBranch("diffusion", 24))

    return build


def _evaluate(root, out, config, **options):
    kwargs = dict(categories=CATEGORIES, shots=[0, 2], seeds=[0, 1], progress=False, log=lambda _m: None)
    kwargs.update(options)
    return evaluate("folder", root, out, config=config, detector_factory=_factory(), **kwargs)


@pytest.fixture(scope="module")
def config():
    return load_preset("tiny").replace(output_size=32, sigma=1.0)


@pytest.fixture(scope="module")
def stored(synthetic_root, tmp_path_factory, config):
    out = tmp_path_factory.mktemp("stored")
    _evaluate(synthetic_root, out, config, save_maps=True)
    return out


GRID = {
    "alpha_map": [0.0, 0.5],
    "sigma": [0.0, 2.0],
    "score_mode": ["terms", "max"],
    "terms": [("clip_L", "diff_V"), ("clip_L", "clip_V", "diff_L", "diff_V")],
}


def test_every_point_equals_a_separate_evaluation(stored, synthetic_root, tmp_path, config):
    result = sweep(stored, GRID, out_dir=tmp_path / "sweep", plots=False, log=lambda _m: None)
    points = grid_points(GRID)
    assert len(result.rows) == len(points) * 2 * 3  # points × categories × (zero-shot + 2 seeds)
    assert result.check == 0.0  # the stored configuration reproduces results.json exactly
    for index in (0, 5, 11, 14):
        runs = _evaluate(synthetic_root, tmp_path / f"p{index}", apply_point(config, points[index]))
        for run in runs:
            row = next(
                r
                for r in result.rows
                if r["point"] == index + 1
                and (r["category"], r["shots"], r["seed"]) == (run["category"], run["shots"], run["seed"])
            )
            for column in METRIC_COLUMNS:
                expected = math.nan if run[column] is None else run[column]
                assert row[column] == pytest.approx(expected, abs=1e-6, nan_ok=True), (index, column)


def test_outputs_tables_and_plots(stored, tmp_path):
    grid = {"alpha_map": [0.0, 0.25, 1.0], "sigma": [0.0, 2.0], "terms": [("clip_V",), ("clip_L", "diff_L")]}
    result = sweep(stored, grid, out_dir=tmp_path, best_by="pixel_aupro", log=lambda _m: None)
    with (tmp_path / "sweep.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 * 6
    assert list(rows[0])[:4] == ["point", "alpha_map", "sigma", "terms"]
    # terms=clip_V has no map in a zero-shot run: its metrics are left empty, not invented
    zero_clip_v = [r for r in rows if r["terms"] == "clip_V" and r["shots"] == "0"]
    assert zero_clip_v and all(r["image_auroc"] == "" for r in zero_clip_v)
    assert all(r["image_auroc"] != "" for r in rows if r["terms"] == "clip_L+diff_L")
    md = (tmp_path / "sweep.md").read_text()
    assert "Random-weight models" in md and "reproduces results.json" in md
    assert "## zero-shot" in md and "## 2-shot (2 seeds: 0, 1)" in md
    assert md.count(" ★ |") == 2 and "**" in md and "- best PRO: #" in md
    payload = json.loads((tmp_path / "sweep.json").read_text())
    assert payload["random_weights"] and len(payload["rows"]) == 72
    names = {p.name for p in result.files if p.suffix == ".png"}
    assert names == {
        "sweep_alpha_map.png",
        "sweep_sigma.png",
        "sweep_terms.png",
        "sweep_heatmap_alpha_map_sigma.png",
        "sweep_heatmap_alpha_map_terms.png",
        "sweep_heatmap_sigma_terms.png",
    }
    for name in names:
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 300


def test_bad_input_is_a_clear_error(stored, tmp_path):
    with pytest.raises(InputError, match="no stored maps"):
        sweep(tmp_path, {"alpha_map": [0.0]})
    with pytest.raises(ConfigError, match="clipfusion evaluate --grid"):
        sweep(stored, {"diffusion.timestep": [50]})
    with pytest.raises(ConfigError, match=r"alpha_map must lie in \[0, 1\]"):
        sweep(stored, {"alpha_map": [1.5]})
    mixed = tmp_path / "mixed"
    (mixed / "maps").mkdir(parents=True)
    files = sorted((stored / "maps").glob("*.npz"))
    for path in files:
        (mixed / "maps" / path.name).write_bytes(path.read_bytes())
    with np.load(files[0]) as data:
        arrays = dict(data)
    arrays["config"] = np.array(json.dumps({**json.loads(str(arrays["config"])), "alpha_map": 0.5}))
    np.savez_compressed(mixed / "maps" / files[0].name, **arrays)
    with pytest.raises(InputError, match="stored with another configuration"):
        sweep(mixed, {"alpha_map": [0.0]})


def test_resume_with_save_maps_redoes_runs_without_maps(synthetic_root, tmp_path, config):
    calls = []
    kwargs = dict(categories=["bottle_cap"], shots=[1], seeds=[0], progress=False, log=lambda _m: None)
    evaluate("folder", synthetic_root, tmp_path, config=config, detector_factory=_factory(calls), **kwargs)
    assert not (tmp_path / "maps").exists()
    evaluate(
        "folder",
        synthetic_root,
        tmp_path,
        config=config,
        detector_factory=_factory(calls),
        resume=True,
        save_maps=True,
        **kwargs,
    )
    assert len(calls) == 2 and len(list((tmp_path / "maps").glob("*.npz"))) == 1
    # a fresh (not resumed) evaluation removes maps of an earlier one
    evaluate("folder", synthetic_root, tmp_path, config=config, detector_factory=_factory(), **kwargs)
    assert not list((tmp_path / "maps").glob("*.npz"))


def test_a_results_file_that_is_not_utf8_is_one_line(stored, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stored, run)
    (run / "results.json").write_bytes(b'{"runs": "\xff"}')
    with pytest.raises(InputError, match=r"results.json: not valid JSON \(not UTF-8 text") as info:
        sweep(run, {"sigma": [1.0]}, plots=False, log=lambda _m: None)
    assert "\n" not in str(info.value)


def test_an_option_that_cannot_change_any_metric_is_said_once_not_swept(stored, tmp_path):
    # the same runs without ground-truth masks: no pixel metrics, and Eq. 9 does not read the fused map
    bare = tmp_path / "bare"
    (bare / "maps").mkdir(parents=True)
    for path in sorted((stored / "maps").glob("*.npz")):
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files if k != "masks"}
        np.savez_compressed(bare / "maps" / path.name, **arrays)
    said = []
    grid = {"alpha_map": [0.0, 0.25, 0.5], "sigma": [0.0, 2.0]}
    result = sweep(bare, grid, out_dir=tmp_path / "s", plots=False, log=said.append)
    [line] = [m for m in said if "alpha_map" in m]
    assert line.startswith("alpha_map cannot change any metric of these runs (no ground-truth masks")
    assert "swept at its stored value 0.25 only, not at 3 values" in line
    assert [p for p in result.points] == [{"sigma": 0.0}, {"sigma": 2.0}]  # not 3 identical rows per sigma
    assert "Not swept: alpha_map cannot change any metric" in (tmp_path / "s" / "sweep.md").read_text()
    # with score_mode max in the grid the fused map makes the score: swept as asked
    grid = {"alpha_map": [0.0, 0.5], "score_mode": ["terms", "max"]}
    result = sweep(bare, grid, out_dir=tmp_path / "m", plots=False, log=lambda _m: None)
    assert len(result.points) == 4 and not result.inert
    with pytest.raises(ConfigError, match=r"alpha_map must lie in \[0, 1\]"):
        sweep(bare, {"alpha_map": [1.5]}, out_dir=tmp_path / "x", plots=False, log=lambda _m: None)
