"""Bad input, generated here case by case, through the CLI and the Python API: one line per problem
naming the file, exit status 2, no traceback, and no model work before the check."""

import io

import numpy as np
import pytest
from PIL import Image

from clipfusion.cli import main
from clipfusion.errors import ClipfusionError, ConfigError, InputError


def _png(path, size=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _truncated(path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _corrupt_jpeg(path):
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    data[200:400] = b"\x00" * 200
    path.write_bytes(bytes(data[:300]))
    return path


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _folder(path):
    path.mkdir()
    return path


CASES = {
    "missing file": (lambda d: d / "nope.png", "nope.png: no such file"),
    "empty folder": (lambda d: _folder(d / "empty"), "folder contains no images"),
    "zero-byte file": (lambda d: _write(d / "zero.png", b""), "zero.png: empty file"),
    "truncated png": (lambda d: _truncated(d / "cut.png"), "cut.png: truncated or corrupt"),
    "corrupt jpeg": (lambda d: _corrupt_jpeg(d / "bad.jpg"), "bad.jpg:"),
    "text named png": (lambda d: _write(d / "t.png", b"hello"), "t.png: not an image"),
    "image too small": (lambda d: _png(d / "small.png", (20, 12)), "small.png: image too small (20×12"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_predict_cli_refuses_each_bad_input_with_one_line(case, tmp_path, capsys):
    make, expected = CASES[case]
    bad = make(tmp_path)
    good = _png(tmp_path / "ok" / "good.png")
    code = main(
        [
            "predict",
            str(bad),
            str(good),
            "--object",
            "part",
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing was written: the check came before any model work


def test_all_problems_are_reported_together(tmp_path, capsys):
    paths = [make(tmp_path) for make, _ in CASES.values()]
    assert (
        main(
            [
                "predict",
                *map(str, paths),
                "--object",
                "part",
                "--preset",
                "tiny",
                "--no-progress",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    for _, expected in CASES.values():
        assert expected in err
    assert err.count("clipfusion: error:") >= len(CASES)


def test_bad_references_are_reported_too(tmp_path, capsys):
    good = _png(tmp_path / "q.png")
    assert (
        main(
            [
                "predict",
                str(good),
                "--refs",
                str(tmp_path / "refs"),
                "--object",
                "part",
                "--preset",
                "tiny",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "refs: no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--preset", "fastest"], "unknown preset 'fastest'"),
        (["--preset", "papr"], "unknown preset 'papr'; did you mean 'paper'? choose one of paper, tiny"),
        (
            ["--set", "alpha_mapp=0.3"],
            "unknown option 'alpha_mapp'; did you mean 'alpha_map'? options: clip.*",
        ),
        (["--set", "clip.patchmode=crops"], "did you mean 'clip.patch_mode' or 'clip.model'? clip options: "),
        (["--set", "alpha_map=2"], "alpha_map must lie in [0, 1]"),
        (["--set", "clip.patch_mode=pixels"], "clip.patch_mode must be one of tokens, crops, windows"),
        (["--set", "nonsense"], "expected KEY=VALUE"),
        (["--set", "diffusion.nope=1"], "unknown option 'diffusion.nope'"),
        (["--dtype", "float16", "--device", "cpu"], "float16 is only supported on CUDA"),
    ],
)
def test_bad_options_are_one_line_errors(argv, expected, tmp_path, capsys):
    good = _png(tmp_path / "q.png")
    assert main(["predict", str(good), "--object", "part", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", "predict", str(tmp_path / "x.png"), "--object", "p", "--preset", "tiny"]) == 2
    # a missing input is found by the check itself, so the traceback appears for errors raised as exceptions
    assert main(["--debug", "config", "--preset", "fastest"]) == 2
    assert "Traceback" in capsys.readouterr().err


def _mvtec(root, category="bottle"):
    for split, defect in (("train", "good"), ("test", "good"), ("test", "broken")):
        for i in range(2):
            _png(root / category / split / defect / f"{i:03d}.png", seed=i)
    for i in range(2):
        mask = root / category / "ground_truth" / "broken" / f"{i:03d}_mask.png"
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (64, 64)).save(mask)
    return root


@pytest.mark.parametrize(
    ("setup", "argv", "expected"),
    [
        (lambda r: r, ["--category", "bottel"], "unknown MVTec AD category 'bottel'; did you mean 'bottle'?"),
        (lambda r: r, ["--category", "bottle", "--shots", "5"], "5 references asked for"),
        (lambda r: r / "bottle", ["--category", "bottle"], "train/good"),
        (
            lambda r: Image.new("L", (10, 10)).save(r / "bottle/ground_truth/broken/000_mask.png") or r,
            ["--category", "bottle"],
            "mask is 10×10 but its image 000.png is 64×64",
        ),
    ],
)
def test_evaluate_refuses_bad_data_sets_before_model_work(setup, argv, expected, tmp_path, capsys):
    root = setup(_mvtec(tmp_path / "mvtec"))
    code = main(
        [
            "evaluate",
            "--dataset",
            "mvtec",
            "--root",
            str(root),
            *argv,
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_python_api_raises_clear_errors(tmp_path):
    from fakes import fake_detector

    det = fake_detector().fit("part")
    with pytest.raises(InputError, match="zero.png: empty file"):
        det.predict([CASES["zero-byte file"][0](tmp_path)])
    with pytest.raises(InputError, match="image too small"):
        det.predict([Image.new("RGB", (8, 8))])
    with pytest.raises(ConfigError):
        det.from_preset("nope")
    assert issubclass(InputError, ClipfusionError)


def test_very_large_images_are_reduced_not_refused(tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.new("RGB", (5000, 120), (90, 90, 90)).save(big)
    out = tmp_path / "out"
    assert (
        main(
            ["predict", str(big), "--object", "part", "--preset", "tiny", "--out", str(out), "--no-progress"]
        )
        == 0
    )
    with Image.open(out / "overlays" / "big.png") as overlay:
        assert overlay.size == (4096, 98)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--out", "{file}"], "--out names an existing file"),
        (["--out", "{file}/sub"], "is a file"),
        (["--refs", "{tmp}/no-refs"], "no-refs: no such file or folder"),
        (["--calibrate", "{tmp}/no-calib"], "no-calib: --calibrate folder not found"),
        (["--calibrate", "{file}"], "--calibrate must name a folder"),
        (["--config", "{tmp}/no.toml"], "no.toml: --config file not found"),
        (["--thresholds", "{tmp}/no.json"], "no.json: --thresholds file not found"),
        (["--log", "{file}/run.log"], "is a file"),
    ],
)
def test_every_path_option_is_checked_before_work(argv, expected, tmp_path, capsys):
    good = _png(tmp_path / "q.png")
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    argv = [a.format(file=afile, tmp=tmp_path) for a in argv]
    preset = [] if "--config" in argv else ["--preset", "tiny"]
    code = main(["predict", str(good), "--object", "part", *preset, *argv, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["config", "--save", "{file}/cfg.toml"], "is a file"),
        (["config", "--save", "{tmp}"], "--save names a folder"),
        (["evaluate", "--dataset", "folder", "--root", "{tmp}/none"], "--root folder not found"),
        (["evaluate", "--dataset", "folder", "--root", "{file}"], "--root must name a folder"),
        (
            ["evaluate", "--dataset", "folder", "--root", "{tmp}", "--out", "{file}"],
            "--out names an existing",
        ),
    ],
)
def test_path_options_of_other_commands_are_checked_too(argv, expected, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    argv = [a.format(file=afile, tmp=tmp_path) for a in argv]
    code = main([*argv, "--preset", "tiny", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and "Traceback" not in err


def test_a_root_that_is_not_the_claimed_layout_is_said_once(tmp_path, capsys):
    root = tmp_path / "textiles"
    for name in ("a.png", "b.png"):
        _png(root / name)
    (root / "notes").mkdir()
    for dataset in ("mvtec", "visa"):
        code = main(
            ["evaluate", "--dataset", dataset, "--root", str(root), "--preset", "tiny", "--no-progress"]
        )
        err = capsys.readouterr().err
        assert code == 2
        assert len([line for line in err.splitlines() if "error:" in line]) == 1, err  # not per category
        assert f"not {'an MVTec AD' if dataset == 'mvtec' else 'a VisA'} root" in err
        assert "found: a.png, b.png, notes/" in err


def test_an_unknown_product_of_a_folder_data_set_names_the_closest_and_every_product(tmp_path, capsys):
    root = _mvtec(_mvtec(tmp_path / "mine", "bottle_cap"), "metal_plate")
    argv = ["evaluate", "--dataset", "folder", "--root", str(root), "--category", "bottle_cp", "metal_plate"]
    assert main([*argv, "--preset", "tiny", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        f"{root}: no product folder 'bottle_cp' (with train/ or test/); did you mean 'bottle_cap'? products "
        "found: bottle_cap, metal_plate"
    ) in err
    assert err.count("clipfusion: error:") == 1 and not (tmp_path / "out").exists()
