"""`clipfusion evaluate --save-maps / --grid` and `clipfusion sweep` as a user runs them (tiny preset: random
weights, so every table says the numbers are a pipeline check)."""

import json

import pytest

from clipfusion.cli import main


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from clipfusion.data import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("cli-sweep"),
        categories=["bottle_cap"],
        n_train=2,
        n_test=4,
        image_size=64,
        seed=4,
    )


def _evaluate(root, out, *extra):
    return main(
        [
            "evaluate",
            "--dataset",
            "folder",
            "--root",
            str(root),
            "--shots",
            "1",
            "--preset",
            "tiny",
            "--set",
            "diffusion.image_size=64",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


@pytest.mark.slow
def test_grid_then_sweep_of_a_point(root, tmp_path, capsys):
    out = tmp_path / "grid"
    assert (
        _evaluate(
            root,
            out,
            "--grid",
            "diffusion.timestep=50,100",
            "--grid",
            "diffusion.feature_blocks=up_blocks.1,up_blocks.1+up_blocks.2",
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "| timestep \\ feature_blocks | up_blocks.1 | up_blocks.1+up_blocks.2 |" in captured.out
    assert "PIPELINE DEMONSTRATION" in captured.out and "model time: vae" in captured.err
    points = json.loads((out / "grid.json").read_text())["points"]
    assert len(points) == 4 and (out / "table.png").is_file()
    point = out / "timestep-100_feature_blocks-up_blocks.1+up_blocks.2"
    summary = (point / "summary.md").read_text()
    assert "PIPELINE DEMONSTRATION" in summary
    assert json.loads((point / "results.json").read_text())["config"]["diffusion"]["feature_blocks"] == [
        "up_blocks.1",
        "up_blocks.2",
    ]
    # resuming a finished grid recomputes nothing
    assert (
        _evaluate(
            root,
            out,
            "--resume",
            "--grid",
            "diffusion.timestep=50,100",
            "--grid",
            "diffusion.feature_blocks=up_blocks.1,up_blocks.1+up_blocks.2",
        )
        == 0
    )
    assert "4 of 4 runs of the grid points already done" in capsys.readouterr().err

    assert (
        main(
            [
                "sweep",
                str(point),
                "--grid",
                "alpha_map=0,1",
                "--grid",
                "terms=clip_L+clip_V,all",
                "--no-progress",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "4 grid points × 1 runs" in captured.err and "Random-weight models" in captured.out
    assert "reproduces results.json" in captured.out
    assert (point / "sweep" / "sweep_heatmap_alpha_map_terms.png").is_file()


def test_sweep_and_grid_option_errors(root, tmp_path, capsys):
    assert main(["sweep", str(tmp_path), "--grid", "alpha_map=0"]) == 2
    assert "no stored maps" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path), "--grid", "diffusion.timestep=50"]) == 2
    assert "clipfusion evaluate --grid" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path), "--grid", "alpha_map=0", "--grid", "alpha_map=1"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert _evaluate(root, tmp_path / "o", "--grid", "alpha_map=0,1") == 2
    assert "clipfusion sweep" in capsys.readouterr().err
    assert _evaluate(root, tmp_path / "o", "--grid", "diffusion.feature_blocks=up_blocks.9") == 2
    assert "up_blocks.9" in capsys.readouterr().err
    assert _evaluate(root, tmp_path / "o", "--latent-memory-mb", "5") == 2
    assert "--grid runs only" in capsys.readouterr().err
