"""The maps file of a run: what is written reads back identical, damaged or foreign files are clear errors."""

import numpy as np
import pytest

from clipfusion.errors import InputError
from clipfusion.evaluation.maps_store import (
    FORMAT,
    list_maps_files,
    load_run_header,
    load_run_maps,
    maps_file,
    save_run_maps,
)


def _write(tmp_path, masks=True):
    rng = np.random.default_rng(0)
    n = 5
    components = {
        "clip_L": rng.random((n, 15, 15), dtype=np.float32),
        "diff_L": rng.random((n, 32, 32), dtype=np.float32),
    }
    gt = rng.random((n, 20, 20)) > 0.9 if masks else None
    path = save_run_maps(
        maps_file(tmp_path, "metal nut/x", 1, 3),
        config={"alpha_map": 0.25},
        run={"category": "metal nut/x", "shots": 1, "seed": 3, "output_size": 20},
        paths=[f"test/{i}.png" for i in range(n)],
        labels=[0, 1, 1, 0, 1],
        defect_types=["good", "scratch", "hole", "good", "scratch"],
        mask_paths=[None, "m1.png", "m2.png", None, "m4.png"],
        components=components,
        s_clip_L=np.linspace(0, 1, n),
        masks=gt,
    )
    return path, components, gt


def test_round_trip(tmp_path):
    path, components, gt = _write(tmp_path)
    assert path.name == "metal_nut_x-1shot-seed3.npz" and list_maps_files(tmp_path) == [path]
    run = load_run_maps(path)
    assert (run.category, run.shots, run.seed) == ("metal nut/x", 1, 3)
    assert run.config == {"alpha_map": 0.25}
    for name, value in components.items():
        assert run.maps[name].dtype == np.float32 and np.array_equal(run.maps[name], value)
    assert set(run.maps) == {"clip_L", "diff_L"}
    assert np.array_equal(run.masks, gt)
    assert run.labels.tolist() == [0, 1, 1, 0, 1]
    assert run.mask_paths[0] == "" and run.mask_paths[1] == "m1.png"
    assert run.defect_types[2] == "hole" and run.paths[4] == "test/4.png"
    assert run.s_clip_L.dtype == np.float32
    components_back = run.components()
    assert set(components_back) == {"clip_L", "diff_L", "s_clip_L"}
    assert load_run_header(path)[1]["seed"] == 3
    with np.load(path, allow_pickle=False) as data:  # a plain npz, no pickle needed
        assert str(data["format"]) == FORMAT


def test_without_masks(tmp_path):
    path, _, _ = _write(tmp_path, masks=False)
    assert load_run_maps(path).masks is None


def test_damaged_and_foreign_files_are_clear_errors(tmp_path):
    bad = tmp_path / "maps" / "x.npz"
    bad.parent.mkdir()
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="x.npz: not a readable maps file"):
        load_run_maps(bad)
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(InputError, match="not a clipfusion-maps/1 maps file"):
        load_run_maps(bad)
