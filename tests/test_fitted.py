"""A fitted detector saved and loaded (``CLIPFusion.save`` / ``CLIPFusion.load``, ``clipfusion.fitted``).

Round trips run the real branches (tiny random-weight preset: plumbing, never detection quality); the checks
on damaged folders use the model-free fake branches, since ``fitted.read`` loads no model.
"""

import json
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from clipfusion import fitted
from clipfusion.config import load_preset
from clipfusion.detector import CLIPFusion
from clipfusion.errors import ClipfusionError, ConfigError, InputError
from fabricate import random_rgb, save_image
from fakes import fake_detector


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return [save_image(root / f"{i}.png", random_rgb(i, (64, 64))) for i in range(7)]


@pytest.fixture(scope="module")
def tiny():
    return CLIPFusion.from_preset("tiny")


def _assert_identical(before, after):
    """Bitwise: the same weights, state and code give the same floats, not merely close ones."""
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert a.score == b.score
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        assert a.maps.keys() == b.maps.keys()
        for name in a.maps:
            np.testing.assert_array_equal(a.maps[name], b.maps[name])


def _no_pickle(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a fitted detector must not be read with pickle")

    for target in ("pickle.load", "pickle.loads", "torch.load"):
        monkeypatch.setattr(target, refuse)
    assert pickle.load is refuse


@pytest.mark.parametrize(("shots", "with_thresholds"), [(0, False), (0, True), (1, False), (1, True)])
def test_a_loaded_detector_predicts_bit_for_bit_what_the_saved_one_did(
    tiny, image_files, tmp_path, monkeypatch, shots, with_thresholds
):
    from clipfusion.calibration import Thresholds

    refs, queries = image_files[:shots], image_files[5:6]
    tiny.fit("metal_nut", refs)
    # calibrate() is tested on its own (and by `clipfusion fit --calibrate`); here what matters is that
    # thresholds travel with the fit
    thresholds = (
        Thresholds(
            0.7, 0.6, 0.9, 2, ("a.png", "b.png"), "metal nut", tuple(map(str, refs)), tiny.config.to_dict()
        )
        if with_thresholds
        else None
    )
    before = tiny.predict(queries)
    tiny.save(tmp_path / "fitted", thresholds)
    names = sorted(p.name for p in (tmp_path / "fitted").iterdir())
    expected = ["clip.safetensors", "config.json", "detector.json", "diffusion.safetensors"]
    assert names == sorted(expected + ["thresholds.json"] * with_thresholds)  # JSON and safetensors only

    _no_pickle(monkeypatch)
    loaded = CLIPFusion.load(tmp_path / "fitted")
    after = loaded.predict(queries)
    _assert_identical(before, after)
    assert loaded.object_name == "metal nut" and loaded.shots == shots
    assert loaded.references == [str(p) for p in refs]
    assert loaded.reference_sha256 == tiny.reference_sha256
    assert all(len(sha) == 64 for sha in loaded.reference_sha256)
    assert loaded.config == tiny.config
    assert loaded.thresholds == thresholds
    if with_thresholds:
        np.testing.assert_array_equal(before[0].mask(0.6), after[0].mask(loaded.thresholds.pixel))
    # the embeddings were saved: neither text encoder was loaded
    assert loaded.diffusion.text_encoder is None and loaded.clip.text_encoder_released
    assert (loaded.clip.memory_bank is None) == (shots == 0)
    assert (loaded.diffusion.memory_bank is None) == (shots == 0)
    record = json.loads((tmp_path / "fitted" / "detector.json").read_text())
    assert record["format"] == fitted.FORMAT and set(record["files"]) == set(names) - {"detector.json"}
    assert {"clipfusion", "torch", "diffusers", "open_clip_torch", "safetensors"} <= set(record["versions"])


def test_weights_other_than_the_fits_are_refused_with_one_line(tiny, image_files, tmp_path):
    from clipfusion.branches.mapdiff import MapDiff

    tiny.fit("bottle").save(tmp_path / "f")
    config = load_preset("tiny").replace(**{"diffusion.init_seed": 1})
    other = MapDiff.from_config(config.branch_configs()[1], text_encoder=False)
    with pytest.raises(ConfigError, match=r"the diffusion weights found .* are not the ones") as caught:
        CLIPFusion.load(tmp_path / "f", diffusion=other)
    assert "\n" not in str(caught.value) and "fingerprint" in str(caught.value)


def _tiny_clip_checkpoint(path, seed):
    from safetensors.torch import save_file

    from clipfusion.models.clip import load_open_clip

    model, _ = load_open_clip("clipfusion-tiny", "random", init_seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_checkpoint_file_replaced_after_the_fit_is_refused(image_files, tmp_path):
    checkpoint = _tiny_clip_checkpoint(tmp_path / "clip" / "open_clip_model.safetensors", seed=0)
    config = load_preset("tiny").replace(
        use_diffusion=False, **{"clip.weights": "pretrained", "clip.checkpoint": str(checkpoint)}
    )
    det = CLIPFusion(config).fit("bottle", image_files[:1])
    before = det.predict(image_files[5:6])
    det.save(tmp_path / "f")
    _assert_identical(before, CLIPFusion.load(tmp_path / "f").predict(image_files[5:6]))

    _tiny_clip_checkpoint(checkpoint, seed=1)  # same path, other weights
    with pytest.raises(ConfigError, match=r"the clip weights found \(pretrained .*open_clip_model") as caught:
        CLIPFusion.load(tmp_path / "f")
    assert "\n" not in str(caught.value)


def test_a_weights_folder_whose_manifest_differs_is_refused_before_loading(image_files, tmp_path):
    from clipfusion.models.weights import MANIFEST, clip_subdir, sha256_file

    folder = tmp_path / "weights"
    rel = f"{clip_subdir('clipfusion-tiny', 'mytag')}/open_clip_model.safetensors"
    _tiny_clip_checkpoint(folder / rel, seed=0)
    manifest = {"format": 1, "complete": True, "sources": [], "files": []}
    manifest["files"].append({"path": rel, "size": 0, "sha256": sha256_file(folder / rel)})
    (folder / MANIFEST).write_text(json.dumps(manifest))
    config = load_preset("tiny").replace(
        use_diffusion=False, **{"clip.weights": "pretrained", "clip.checkpoint": "mytag"}
    )
    CLIPFusion(config, weights_dir=folder).fit("bottle").save(tmp_path / "f")
    record = json.loads((tmp_path / "f" / "detector.json").read_text())
    assert record["branches"]["clip"]["weights"]["source"]["weights_dir_files"] == {
        rel: manifest["files"][0]["sha256"]
    }
    assert CLIPFusion.load(tmp_path / "f", weights_dir=folder).object_name == "bottle"

    manifest["files"][0]["sha256"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        ConfigError, match=r"the clip weights differ from the fit's: .*open_clip_model.safetensors"
    ):
        CLIPFusion.load(tmp_path / "f", weights_dir=folder)


# -- damaged, foreign and incomplete folders: refused by fitted.read before any model is loaded ------------


@pytest.fixture
def saved(tmp_path):
    det = fake_detector().fit("bottle", [Image.fromarray(random_rgb(0, (32, 32)))])
    return det.save(tmp_path / "f")


def _edit_record(path, **changes):
    record = json.loads((path / "detector.json").read_text())
    record.update(changes)
    (path / "detector.json").write_text(json.dumps(record))


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda p: _flip_a_byte(p / "clip.safetensors"),
            r"clip.safetensors: changed since the detector was saved",
        ),
        (
            lambda p: (p / "diffusion.safetensors").unlink(),
            r"incomplete fitted detector: diffusion.safetensors is missing",
        ),
        (lambda p: (p / "config.json").write_text("{}"), r"config.json: changed since"),
        (lambda p: (p / "detector.json").write_text("{not json"), r"detector.json: not valid JSON"),
        (lambda p: (p / "detector.json").unlink(), r"not a fitted clipfusion detector \(no detector.json\)"),
        (lambda p: _edit_record(p, kind="something else"), r"not a fitted clipfusion detector"),
        (
            lambda p: _edit_record(p, format=99),
            r"fitted detector format 99; this clipfusion .* reads format 1",
        ),
        (lambda p: _edit_record(p, files={"config.json": "x", "model.pkl": "y"}), r"lists 'model.pkl'"),
        (lambda p: _edit_record(p, branches={}), r"no saved state of the clip branch"),
        (lambda p: shutil.rmtree(p), r"no such folder"),
    ],
)
def test_a_damaged_or_foreign_folder_is_refused_with_one_line(saved, damage, message):
    damage(saved)
    with pytest.raises(InputError, match=message) as caught:
        fitted.read(saved)
    assert "\n" not in str(caught.value)


def test_the_fake_branches_round_trip_through_the_protocol(saved):
    det = fake_detector()
    loaded = fitted.load(type(det), saved, clip=det.clip, diffusion=det.diffusion)
    assert loaded.object_name == "bottle" and loaded.clip.memory_bank is not None


def test_save_refuses_an_unfitted_detector_and_a_foreign_folder(tmp_path):
    with pytest.raises(ClipfusionError, match="fit the detector first"):
        fake_detector().save(tmp_path / "f")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty and not a fitted detector"):
        fake_detector().fit("bottle").save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_saving_again_replaces_the_fit_and_drops_stale_thresholds(tmp_path):
    from clipfusion.calibration import Thresholds

    det = fake_detector().fit("bottle")
    det.save(
        tmp_path / "f", Thresholds(image=0.5, pixel=0.4, object_name="bottle", config=det.config.to_dict())
    )
    assert fitted.read(tmp_path / "f").thresholds.image == 0.5
    det.fit("screw").save(tmp_path / "f")
    record = fitted.read(tmp_path / "f")
    assert record.thresholds is None and record.object_name == "screw"
    assert not (tmp_path / "f" / "thresholds.json").exists()


def test_thresholds_of_another_fit_are_refused_at_save(tmp_path):
    from clipfusion.calibration import Thresholds

    det = fake_detector().fit("bottle")
    with pytest.raises(ConfigError, match="calibrated for 'screw'"):
        det.save(tmp_path / "f", Thresholds(image=0.5, pixel=0.4, object_name="screw"))
    other = det.config.replace(alpha_map=0.5).to_dict()
    with pytest.raises(ConfigError, match="another configuration"):
        det.save(tmp_path / "f", Thresholds(image=0.5, pixel=0.4, config=other))
