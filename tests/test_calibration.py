"""Thresholds from normal images: the library function is what the CLI uses, files round-trip and refuse
another configuration."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from clipfusion import Thresholds, calibrate
from clipfusion.calibration import thresholds_from_results
from clipfusion.errors import ConfigError, InputError
from fakes import fake_detector


def test_thresholds_are_quantiles_of_scores_and_map_maxima():
    image, pixel = thresholds_from_results([0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0], 0.5)
    assert (image, pixel) == (pytest.approx(0.3), pytest.approx(3.0))
    assert thresholds_from_results([0.1, 0.9], [1.0, 5.0], 1.0) == (pytest.approx(0.9), pytest.approx(5.0))
    with pytest.raises(ConfigError, match="quantile"):
        thresholds_from_results([0.1], [1.0], 0.0)
    with pytest.raises(InputError, match="at least one"):
        thresholds_from_results([], [], 0.9)


def test_calibrate_uses_the_detectors_predictions(synthetic_root):
    det = fake_detector().fit(
        "woven fabric", sorted((synthetic_root / "woven_fabric/train/good").glob("*"))[:2]
    )
    normals = sorted((synthetic_root / "woven_fabric/test/good").glob("*.png"))
    thresholds = calibrate(det, normals, quantile=0.9)
    results = det.predict(normals)
    assert thresholds.image == pytest.approx(float(np.quantile([r.score for r in results], 0.9)))
    assert thresholds.pixel == pytest.approx(float(np.quantile([r.anomaly_map.max() for r in results], 0.9)))
    assert thresholds.n_images == len(normals) and thresholds.files == tuple(map(str, normals))
    assert thresholds.config == det.config.to_dict() and thresholds.object_name == "woven fabric"


def test_calibration_files_are_recorded_as_the_references_are_absolute(synthetic_root, monkeypatch):
    monkeypatch.chdir(synthetic_root / "woven_fabric")
    det = fake_detector().fit("woven fabric", [sorted(Path("train/good").glob("*.png"))[0]])
    normals = sorted(Path("test/good").glob("*.png"))[:2]
    thresholds = calibrate(det, [str(p) for p in normals], quantile=0.9)
    assert thresholds.files == tuple(str(Path.cwd() / p) for p in normals)
    assert all(Path(r).is_absolute() for r in thresholds.references)


def test_save_load_round_trip_and_configuration_check(tmp_path):
    det = fake_detector()
    thresholds = Thresholds(
        0.5, 0.7, 0.95, 3, ("a.png", "b.png", "c.png"), "bottle", (), det.config.to_dict()
    )
    path = thresholds.save(tmp_path / "t.json")
    assert Thresholds.load(path) == thresholds
    thresholds.check_config(det.config.to_dict())  # the same configuration: accepted
    other = det.config.replace(alpha_map=0.5, sigma=1.0).to_dict()
    with pytest.raises(ConfigError, match=re.escape("differs in alpha_map, sigma")):
        thresholds.check_config(other)
    (tmp_path / "bad.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(InputError, match="bad.json: not a clipfusion thresholds file"):
        Thresholds.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="broken.json: not valid JSON"):
        Thresholds.load(tmp_path / "broken.json")


def test_values_set_by_hand_never_claim_the_calibration_and_keep_what_was_not_moved(tmp_path):
    calibrated = Thresholds(0.41, 0.3415, 0.99, 20, ("/n/a.png", "/n/b.png"), "bottle", ("/r.png",), {"k": 1})
    moved = calibrated.with_values(0.5, 0.3415)
    data = moved.to_dict()
    assert (data["image"], data["pixel"]) == (0.5, 0.3415)  # the pixel value as calibrated, exactly
    assert data["origin"] == "set by hand" and data["set_by_hand"] == ["image"]
    assert data["set_from"] == {
        "image": 0.41,
        "pixel": 0.3415,
        "quantile": 0.99,
        "n_images": 20,
        "files": ["/n/a.png", "/n/b.png"],
    }
    assert not {"quantile", "n_images", "files"} & set(data)  # no calibration beside values it did not make
    assert Thresholds.load(moved.save(tmp_path / "t.json")) == moved
    assert moved.calibration() == calibrated and moved.with_values(0.41, 0.3415) == calibrated
    assert (
        calibrated.to_dict()["origin"] == "calibration" and calibrated.with_values(0.41, 0.3415) is calibrated
    )
    # a second move starts from the same calibration, not from the first move
    again = moved.with_values(0.5, 0.2)
    assert again.by_hand == ("image", "pixel") and again.calibrated == (0.41, 0.3415)
    # no calibration at all: both values by hand, no quantile
    det = fake_detector().fit("bottle", [])
    bare = Thresholds.hand_set(0.5, 0.25, det).to_dict()
    assert bare["origin"] == "set by hand" and bare["set_from"] is None and "quantile" not in bare
    # files written before thresholds said where they came from still load, and say it now
    legacy = {"format": 1, "image": 0.5, "pixel": 0.2, "quantile": 0.99, "n_images": 0, "files": []}
    assert Thresholds.from_dict(legacy).origin == "set by hand"
    assert Thresholds.from_dict({**legacy, "n_images": 4}).origin == "calibration"
    with pytest.raises(InputError, match="origin 'guess'"):
        Thresholds.from_dict({**legacy, "origin": "guess"})


def test_the_cli_calibration_equals_the_library_function(synthetic_root, tmp_path, capsys):
    from clipfusion.cli import main
    from clipfusion.detector import CLIPFusion

    category = synthetic_root / "woven_fabric"
    refs = sorted((category / "train/good").glob("*.png"))[:2]
    normals = tmp_path / "normals"
    normals.mkdir()
    for path in sorted((category / "test/good").glob("*.png"))[:4]:
        (normals / path.name).write_bytes(path.read_bytes())
    queries = sorted((category / "test").rglob("*.png"))[:2]
    argv = ["predict", *map(str, queries), "--object", "woven fabric", "--refs", *map(str, refs)]
    argv += [
        "--calibrate",
        str(normals),
        "--quantile",
        "0.9",
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--no-progress"]) == 0
    printed = re.search(r"threshold ([0-9.e+-]+), pixel threshold ([0-9.e+-]+)", capsys.readouterr().err)
    det = CLIPFusion.from_preset("tiny").fit("woven fabric", refs)
    thresholds = calibrate(det, sorted(normals.glob("*.png")), quantile=0.9)
    assert float(printed.group(1)) == pytest.approx(thresholds.image, abs=1e-6)
    assert float(printed.group(2)) == pytest.approx(thresholds.pixel, abs=1e-6)
