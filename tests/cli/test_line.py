"""Several products in one command (tiny random-weight preset: plumbing, never detection quality):
`clipfusion fit --refs-root / --dataset` on one load of the models, `clipfusion predict --fitted A B …` on a
mixed batch routed by a list or by folders — each object's outputs those of its own single-object run."""

import csv
import json
import shutil

import pytest

from clipfusion.cli import main

OBJECTS = ("bottle_cap", "woven_fabric")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from clipfusion.data import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("line"), categories=list(OBJECTS), n_train=3, n_test=4, image_size=96, seed=3
    )


@pytest.fixture(scope="module")
def fits(root, tmp_path_factory):
    """One `clipfusion fit --dataset folder` for both objects (1-shot, the references drawn as evaluate
    draws them), and the same objects fitted one by one, each alone."""
    base = tmp_path_factory.mktemp("line-fits")
    argv = ["fit", "--dataset", "folder", "--root", str(root), "--shots", "1", "--seed", "2"]
    assert main([*argv, "--preset", "tiny", "--out", str(base / "together"), "--no-progress", "-q"]) == 0
    for name in OBJECTS:
        recorded = json.loads((base / "together" / name / "detector.json").read_text())
        refs = [r["name"] for r in recorded["references"]]
        one = [
            "fit",
            "--object",
            name,
            "--refs",
            *refs,
            "--preset",
            "tiny",
            "--out",
            str(base / "alone" / name),
        ]
        assert main([*one, "--no-progress", "-q"]) == 0
    return base


@pytest.fixture(scope="module")
def mixed(root, tmp_path_factory):
    """A folder of sub-folders named after the objects (two test images each)."""
    folder = tmp_path_factory.mktemp("mixed")
    for name in OBJECTS:
        (folder / name).mkdir()
        for path in sorted((root / name / "test").rglob("*.png"))[:2]:
            shutil.copy(path, folder / name / f"{path.parent.name}_{path.name}")
    return folder


def test_fitting_several_objects_at_once_writes_each_fit_as_fitting_it_alone(fits):
    for name in OBJECTS:
        for file in ("clip.safetensors", "diffusion.safetensors", "config.json"):
            together = (fits / "together" / name / file).read_bytes()
            assert together == (fits / "alone" / name / file).read_bytes(), (name, file)
        record = json.loads((fits / "together" / name / "detector.json").read_text())
        assert record["object_name"] == name.replace("_", " ") and record["shots"] == 1


def test_a_mixed_batch_by_folders_gives_each_object_its_own_run(fits, mixed, tmp_path):
    folders = [str(fits / "together" / name) for name in OBJECTS]
    out = tmp_path / "line"
    # as the issue writes it: the fitted folders, then the inputs
    assert main(["predict", "--fitted", *folders, str(mixed), "--out", str(out), "--no-progress", "-q"]) == 0
    with (out / "scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "object", "score", "decision", "overlay", "map", "mask", "weights"]
    assert [r["object"] for r in rows] == [OBJECTS[0]] * 2 + [OBJECTS[1]] * 2
    assert all((out / r["map"]).is_file() and (out / r["overlay"]).is_file() for r in rows)
    assert "bottle_cap/report.html" in (out / "report.html").read_text()
    # each object's folder is its own single-object run of the same inputs, byte for byte
    alone = tmp_path / "alone"
    name = OBJECTS[1]
    argv = ["predict", str(mixed / name), "--fitted", folders[1], "--out", str(alone), "--no-progress", "-q"]
    assert main(argv) == 0
    for file in [
        "scores.csv",
        "report.html",
        *(f.relative_to(alone).as_posix() for f in alone.rglob("*.npy")),
    ]:
        assert (out / name / file).read_bytes() == (alone / file).read_bytes(), file
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and f"{name}/manifest.json" in manifest["files"]


def test_a_list_routes_rows_to_their_objects_and_refuses_unknown_ones(fits, mixed, tmp_path, capsys):
    folders = [f"{name}={fits / 'together' / name}" for name in OBJECTS]
    listing = tmp_path / "inputs.csv"
    files = sorted(mixed.rglob("*.png"))
    rows = [(f.relative_to(tmp_path.parent).as_posix(), f.parent.name) for f in files]
    text = "path,object\n" + "".join(f"../{p},{o}\n" for p, o in reversed(rows))
    listing.write_text(text)
    out = tmp_path / "by-list"
    assert (
        main(["predict", str(listing), "--fitted", *folders, "--out", str(out), "--no-progress", "-q"]) == 0
    )
    with (out / "scores.csv").open() as fh:
        assert sorted(r["object"] for r in csv.DictReader(fh)) == sorted(f.parent.name for f in files)
    listing.write_text(text + "../x.png,cabel\n")
    argv = ["predict", str(listing), "--fitted", *folders, "--out", str(tmp_path / "bad")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"names the object 'cabel', which no fitted folder is (known: {', '.join(OBJECTS)})" in err
    assert err.count("clipfusion: error:") == 1 and not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (lambda f: ["--fitted", f"a={f[0]}", f"a={f[1]}"], "two detectors named 'a'"),
        (lambda f: ["--fitted", *f, "--threshold", "0.5"], "each keeps the thresholds of its own fit"),
        (lambda f: ["--fitted", *f, "--calibrate", "x"], "each keeps the thresholds of its own fit"),
    ],
)
def test_several_fitted_objects_refuse_what_cannot_apply_in_one_line(
    fits, mixed, tmp_path, capsys, extra, message
):
    folders = [str(fits / "together" / name) for name in OBJECTS]
    assert main(["predict", str(mixed), *extra(folders), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_loose_images_with_several_objects_say_how_to_route_them(fits, mixed, tmp_path, capsys):
    folders = [str(fits / "together" / name) for name in OBJECTS]
    image = next(mixed.rglob("*.png"))
    assert (
        main(["predict", str(image), "--fitted", *folders, "--out", str(tmp_path / "o"), "--no-progress"])
        == 2
    )
    assert "every input must say its object" in capsys.readouterr().err


def test_a_fitted_folder_of_other_weights_is_one_line_and_nothing_is_written(fits, mixed, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(fits / "together" / OBJECTS[1], other)
    record = json.loads((other / "detector.json").read_text())
    record["branches"]["clip"]["weights"]["fingerprint"] = "f" * 32  # fitted with other weights
    (other / "detector.json").write_text(json.dumps(record))
    renamed = tmp_path / "routed"
    shutil.copytree(mixed, renamed)
    (renamed / OBJECTS[1]).rename(renamed / "other")
    folders = [str(fits / "together" / OBJECTS[0]), str(other)]
    out = tmp_path / "o"
    assert main(["predict", str(renamed), "--fitted", *folders, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the clip weights found" in err and err.count("clipfusion: error:") == 1
    assert not out.exists()
