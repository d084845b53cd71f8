"""`clipfusion fit` then `clipfusion predict --fitted`, as a user runs them (tiny random-weight preset on
synthetic images: plumbing, never detection quality)."""

import csv
import json

import numpy as np
import pytest

from clipfusion.cli import main


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    from clipfusion.data import make_synthetic_dataset

    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("fit"), categories=["bottle_cap"], n_train=3, n_test=2, image_size=96, seed=2
    )
    good = sorted((root / "bottle_cap" / "train" / "good").iterdir())
    refs, calib = tmp_path_factory.mktemp("refs"), tmp_path_factory.mktemp("calib")
    for p in good[:1]:
        (refs / p.name).write_bytes(p.read_bytes())
    for p in good[1:2]:
        (calib / p.name).write_bytes(p.read_bytes())
    return {"test": root / "bottle_cap" / "test", "refs": refs, "calib": calib}


def _scores(out):
    with (out / "scores.csv").open() as fh:
        return {row["path"]: row for row in csv.DictReader(fh)}


@pytest.mark.slow
def test_fit_then_predict_fitted_equals_a_predict_that_fits(product, tmp_path, capsys):
    fitted = tmp_path / "fitted" / "bottle_cap"
    common = ["--preset", "tiny", "--no-progress"]
    fit = [
        "fit",
        "--object",
        "bottle cap",
        "--refs",
        str(product["refs"]),
        "--calibrate",
        str(product["calib"]),
    ]
    assert main([*fit, "--quantile", "0.9", "--out", str(fitted), *common]) == 0
    err = capsys.readouterr().err
    assert all(f"[{i}/4]" in err for i in range(1, 5)) and "PIPELINE DEMONSTRATION" in err
    assert sorted(p.suffix for p in fitted.iterdir()) == [
        ".json",
        ".json",
        ".json",
        ".safetensors",
        ".safetensors",
    ]

    assert (
        main(
            [
                "predict",
                str(product["test"]),
                "--fitted",
                str(fitted),
                "--out",
                str(tmp_path / "a"),
                "--no-progress",
            ]
        )
        == 0
    )
    # the same fit done by predict itself: the same scores, decisions and maps
    argv = ["predict", str(product["test"]), "--object", "bottle cap", "--refs", str(product["refs"])]
    argv += ["--calibrate", str(product["calib"]), "--quantile", "0.9", "--out", str(tmp_path / "b"), *common]
    assert main(argv) == 0
    a, b = _scores(tmp_path / "a"), _scores(tmp_path / "b")
    assert a == b and len(a) == 2 and {r["decision"] for r in a.values()} <= {"normal", "anomalous"}
    for path in (tmp_path / "a" / "maps").rglob("*.npy"):
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        np.testing.assert_array_equal(np.load(path), np.load(twin))
    assert len(list((tmp_path / "a" / "masks").rglob("*.png"))) == 2  # pixel threshold from the fitted folder
    assert json.loads((tmp_path / "a" / "config.json").read_text())["preset"] == "tiny"


@pytest.mark.parametrize(
    "extra", [["--object", "cap"], ["--refs", "x.png"], ["--preset", "tiny"], ["--set", "alpha_map=0.3"]]
)
def test_predict_fitted_refuses_the_options_it_replaces_with_one_line(product, tmp_path, capsys, extra):
    argv = ["predict", str(product["test"]), "--fitted", str(tmp_path), *extra, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--fitted takes the object" in err and extra[0] in err
    assert not (tmp_path / "o").exists()


def test_predict_fitted_on_a_folder_that_is_not_one_exits_2(product, tmp_path, capsys):
    (tmp_path / "f").mkdir()
    argv = ["predict", str(product["test"]), "--fitted", str(tmp_path / "f"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a fitted clipfusion detector" in err and "Traceback" not in err


def test_predict_needs_an_object_or_a_fitted_detector(product, tmp_path, capsys):
    assert main(["predict", str(product["test"]), "--preset", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert "give --object NAME" in capsys.readouterr().err


def test_fit_refuses_a_non_empty_foreign_output_folder_before_loading(product, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    argv = ["fit", "--object", "cap", "--out", str(tmp_path), "--preset", "tiny", "--no-progress"]
    assert main(argv) == 2
    assert "is not empty and holds no fitted detector" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_fit_refuses_an_existing_fitted_folder_unless_overwrite_and_says_what_goes(product, tmp_path, capsys):
    out = tmp_path / "fitted"
    argv = ["fit", "--object", "cap", "--refs", str(product["refs"]), "--preset", "tiny", "--no-progress"]
    assert main([*argv, "--calibrate", str(product["calib"]), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a fitted detector ('cap', 1-shot, thresholds calibrated on 1 images" in err
    assert "add --overwrite to replace it" in err and "loading" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, thresholds.json included
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    said = capsys.readouterr().err
    assert f"replacing the fitted detector in {out}: 'cap', 1-shot" in said
    assert "its calibrated thresholds go: this fit has none" in said
    assert not (out / "thresholds.json").exists()
