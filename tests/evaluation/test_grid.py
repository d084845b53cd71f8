"""`evaluate --grid` on the tiny preset (random weights: plumbing, not quality) and synthetic data: each grid
point equals a separate evaluation with its configuration, the shared work is done once, an interrupted
grid resumes, and `sweep` works on a grid point."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from clipfusion.config import load_preset
from clipfusion.detector import CLIPFusion
from clipfusion.evaluation import evaluate
from clipfusion.evaluation.grid import LatentCache, build_config, evaluate_grid, grid_config_points
from clipfusion.evaluation.grid.engine import GridEngine as _GridEngine
from clipfusion.evaluation.gridspec import apply_point
from clipfusion.evaluation.results import METRIC_COLUMNS
from clipfusion.evaluation.sweep import sweep

GRID = {"diffusion.timestep": [50, 200], "diffusion.feature_blocks": [("up_blocks.0",), ("up_blocks.2",)]}
PROTOCOL = dict(categories=["bottle_cap"], shots=[0, 1], seeds=[0], batch_size=2, progress=False)
N_TEST = 4


@pytest.fixture(scope="module")
def config():
    # the tiny preset at a 64 px diffusion input: the same code path in a quarter of the UNet time
    return load_preset("tiny").replace(device="cpu", **{"diffusion.image_size": 64})


@pytest.fixture(scope="module")
def factory(config):
    """Detectors on modules built once (a fresh CLIP model each: releasing its text tower mutates it)."""
    from clipfusion.branches.mapdiff import MapDiff
    from clipfusion.branches.patchclip import PatchCLIP

    clip_config, diffusion_config = config.branch_configs()
    clip = PatchCLIP.from_config(clip_config)
    # loaded for every block the grid's points read (as evaluate_grid's build_config does): the early exit
    # of the base options alone drops what follows up_blocks.2's last cross-attention, its output included
    blocks = tuple(dict.fromkeys(b for blocks in GRID["diffusion.feature_blocks"] for b in blocks))
    diffusion = MapDiff.from_config(replace(diffusion_config, feature_blocks=blocks))
    built = []

    def build(cfg):
        clip_cfg, diff_cfg = cfg.branch_configs()
        # the UNet is shared: releasing the text encoder must not replace its layers by one run's tables
        diff_cfg = replace(diff_cfg, precompute_conditioning=False)
        built.append(cfg)
        return CLIPFusion(
            cfg,
            clip=PatchCLIP(copy.deepcopy(clip.model), clip.tokenizer, clip_cfg),
            diffusion=MapDiff(
                diffusion.vae,
                diffusion.unet,
                diffusion.text_encoder,
                diffusion.tokenizer,
                diffusion.scheduler,
                diff_cfg,
            ),
        )

    build.built = built
    return build


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from clipfusion.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("grid-data")
    return make_synthetic_dataset(
        root, categories=["bottle_cap"], n_train=3, n_test=N_TEST, image_size=64, seed=3
    )


@pytest.fixture(scope="module")
def grid_run(data, tmp_path_factory, config, factory):
    out = tmp_path_factory.mktemp("grid")
    # a zero memory limit streams every latent batch through a file: the path large test splits take
    result = evaluate_grid(
        "folder",
        data,
        out,
        config=config,
        grid=GRID,
        detector_factory=factory,
        log=lambda _m: None,
        latent_memory_mb=0,
        **PROTOCOL,
    )
    return out, result


def test_the_grid_builds_its_model_for_every_block_of_every_point(config, tmp_path):
    # a MapDiff built for early exit may leave out the UNet modules after the last block its configuration
    # reads: the grid's model is built with the blocks of every point
    grid = {**GRID, "diffusion.attention_blocks": [("up_blocks.1",), ("up_blocks.1", "up_blocks.2")]}
    built = build_config(config, grid_config_points(config, grid, tmp_path))
    assert built.diffusion.feature_blocks == ("up_blocks.0", "up_blocks.2")
    assert built.diffusion.attention_blocks == ("up_blocks.1", "up_blocks.2")
    assert built.diffusion.timestep == config.diffusion.timestep and built.clip == config.clip


def _rows(path):
    return {(r["category"], r["shots"], r["seed"]): r for r in json.loads(path.read_text())["runs"]}


@pytest.mark.slow
def test_a_grid_point_equals_a_separate_evaluation(grid_run, data, tmp_path, config, factory):
    out, result = grid_run
    # the work the points share was done once: each image through the VAE once for the whole grid (4 test
    # images, 1 reference), one UNet pass per image and timestep for all blocks and runs
    assert result.counts["vae_images"] == N_TEST + 1
    assert result.counts["unet_images"] == 2 * (N_TEST + 1)
    assert len(list(out.glob(".latents-*"))) == 0  # the streamed latents are removed afterwards
    assert factory.built[0].diffusion.feature_blocks == ("up_blocks.0", "up_blocks.2")  # see build_config
    point = {"diffusion.timestep": 200, "diffusion.feature_blocks": ("up_blocks.0",)}
    separate = tmp_path / "separate"
    evaluate(
        "folder",
        data,
        separate,
        config=apply_point(config, point),
        detector_factory=factory,
        log=lambda _m: None,
        save_maps=True,
        **PROTOCOL,
    )
    folder = out / "timestep-200_feature_blocks-up_blocks.0"
    ours, theirs = _rows(folder / "results.json"), _rows(separate / "results.json")
    assert ours.keys() == theirs.keys() and len(ours) == 2
    for key, row in theirs.items():
        for column in METRIC_COLUMNS:
            assert ours[key][column] == pytest.approx(row[column], abs=1e-6), (key, column)
    # not only the metrics: the stored maps are the same numbers
    for path in sorted((separate / "maps").glob("*.npz")):
        with np.load(path) as a, np.load(folder / "maps" / path.name) as b:
            for name in ("clip_L", "clip_V", "diff_L", "diff_V", "s_clip_L", "masks"):
                assert (name in a.files) == (name in b.files)
                if name in a.files:
                    assert np.array_equal(a[name], b[name]), (path.name, name)
    # the feature block matters to diff_V only: zero-shot maps agree across blocks, few-shot ones do not
    other = out / "timestep-200_feature_blocks-up_blocks.2" / "maps"
    with (
        np.load(folder / "maps" / "bottle_cap-1shot-seed0.npz") as a,
        np.load(other / "bottle_cap-1shot-seed0.npz") as b,
    ):
        assert np.array_equal(a["diff_L"], b["diff_L"]) and not np.array_equal(a["diff_V"], b["diff_V"])


@pytest.mark.slow
def test_table_and_sweep_of_a_grid_point(grid_run, data, tmp_path, config, factory):
    out, _ = grid_run
    table = (out / "table.md").read_text()
    assert "Random-weight models" in table  # no note given: the library adds the warning itself
    assert (
        "Random-weight models" in (out / "timestep-50_feature_blocks-up_blocks.0" / "summary.md").read_text()
    )
    assert "| timestep \\ feature_blocks | up_blocks.0 | up_blocks.2 |" in table
    assert "| 50 | " in table and "| 200 | " in table and "## 1-shot" in table
    with Image.open(out / "table.png") as image:
        assert image.format == "PNG"
    grid = json.loads((out / "grid.json").read_text())
    assert grid["points"][0]["folder"] == "timestep-50_feature_blocks-up_blocks.0"
    # a fusion point swept from a grid point's maps equals a separate evaluation of that configuration
    folder = out / "timestep-50_feature_blocks-up_blocks.2"
    fusion = {"alpha_map": [0.5], "sigma": [1.0], "score_mode": ["max"]}
    result = sweep(folder, fusion, out_dir=tmp_path / "sweep", plots=False, log=lambda _m: None)
    assert result.check == 0.0
    point = {
        "diffusion.timestep": 50,
        "diffusion.feature_blocks": ("up_blocks.2",),
        "alpha_map": 0.5,
        "sigma": 1.0,
        "score_mode": "max",
    }
    runs = evaluate(
        "folder",
        data,
        tmp_path / "separate",
        config=apply_point(config, point),
        detector_factory=factory,
        log=lambda _m: None,
        **PROTOCOL,
    )
    for run in runs:
        row = next(r for r in result.rows if (r["shots"], r["seed"]) == (run["shots"], run["seed"]))
        for column in METRIC_COLUMNS:
            assert row[column] == pytest.approx(run[column], abs=1e-6), column


@pytest.mark.slow
def test_an_interrupted_grid_resumes_to_the_same_results(
    grid_run, data, tmp_path, config, factory, monkeypatch
):
    out, _ = grid_run
    finish = _GridEngine._finish
    calls = []

    def interrupted(self, *args, **kwargs):
        if len(calls) == 4:  # after the four (point, run) pairs of the first timestep
            raise KeyboardInterrupt
        calls.append(1)
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(_GridEngine, "_finish", interrupted)
    kwargs = dict(config=config, grid=GRID, detector_factory=factory, log=lambda _m: None, **PROTOCOL)
    with pytest.raises(KeyboardInterrupt):
        evaluate_grid("folder", data, tmp_path, **kwargs)
    assert len(calls) == 4 and not list(tmp_path.glob(".latents-*"))
    monkeypatch.setattr(_GridEngine, "_finish", finish)
    messages = []
    resumed = evaluate_grid("folder", data, tmp_path, resume=True, **{**kwargs, "log": messages.append})
    assert any("4 of 8 runs of the grid points already done" in m for m in messages)
    # only what was missing was computed: the finished timestep needed no UNet pass at all
    assert resumed.counts["unet_images"] == N_TEST + 1
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        assert (tmp_path / folder.name / "results.csv").read_text() == (folder / "results.csv").read_text()
    # everything done: resuming again builds no detector
    before = len(factory.built)
    evaluate_grid("folder", data, tmp_path, resume=True, **kwargs)
    assert len(factory.built) == before


def test_latent_cache_streams_above_its_limit(tmp_path):
    cache = LatentCache(memory_limit=100, spill_dir=tmp_path / "spill")
    small, large = torch.rand(2, 3), torch.rand(4, 4, 8, 8)
    assert torch.equal(cache.get(("a",), lambda: small), small)
    assert torch.equal(cache.get(("b", "c"), lambda: large), large)
    assert cache.bytes_in_memory == small.numel() * 4 and len(list((tmp_path / "spill").iterdir())) == 1
    assert torch.equal(cache.get(("b", "c"), lambda: pytest.fail("recomputed")), large)
    assert (cache.encoded, cache.reused) == (3, 2)
    cache.clear()
    assert not list((tmp_path / "spill").iterdir())
