import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipfusion.config import load_preset
from clipfusion.detector import AnomalyResult, CLIPFusion
from clipfusion.errors import ClipfusionError, ConfigError
from clipfusion.fusion import fuse
from fakes import FakeBranch, fake_detector


def _images(n, seed=0, size=48):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_zero_shot_result_has_four_maps_with_zero_visual_terms():
    det = fake_detector().fit("metal_nut")
    assert det.object_name == "metal nut"
    [result] = det.predict(_images(1))
    assert isinstance(result, AnomalyResult)
    assert set(result.maps) == {"clip_L", "clip_V", "diff_L", "diff_V"}
    assert result.anomaly_map.shape == (32, 32) and result.anomaly_map.dtype == np.float32
    assert not result.maps["clip_V"].any() and not result.maps["diff_V"].any()
    assert result.maps["clip_L"].any()
    assert result.config["preset"] == "tiny"


def test_fused_map_and_score_follow_the_fusion_of_the_branch_outputs():
    det = fake_detector().fit("bottle", _images(2, seed=1))
    images = _images(3, seed=2)
    results = det.predict(images)
    raw = {**det.clip.predict(images), **det.diffusion.predict(images)}
    cfg = det.config
    expected_map, expected_score, _ = fuse(
        {k: raw[k] for k in ("clip_L", "clip_V", "diff_L", "diff_V")},
        raw["s_clip_L"],
        alpha_map=cfg.alpha_map,
        alpha_score=cfg.alpha_score,
        sigma=cfg.sigma,
        output_size=cfg.output_size,
    )
    for i, result in enumerate(results):
        np.testing.assert_allclose(result.anomaly_map, expected_map[i].numpy(), atol=1e-6)
        assert result.score == pytest.approx(float(expected_score[i]), abs=1e-6)
        assert result.maps["clip_V"].any()


def test_batching_does_not_change_results_and_is_respected():
    det = fake_detector().fit("bottle", _images(1, seed=3))
    images = _images(5, seed=4)
    one = det.predict(images, batch_size=1)
    det.clip.batches.clear()
    all_at_once = det.predict(images, batch_size=5)
    assert det.clip.batches == [5]
    for a, b in zip(one, all_at_once, strict=True):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
        assert a.score == pytest.approx(b.score, abs=1e-6)


def test_paths_and_pil_images_give_the_same_answer(tmp_path):
    images = _images(2, seed=5)
    paths = []
    for i, img in enumerate(images):
        img.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    det = fake_detector().fit("bottle", [paths[0]])
    assert det.references == [str(paths[0])]
    from_paths = det.predict(paths)
    from_pil = det.predict(images)
    assert from_paths[0].image_path == str(paths[0]) and from_pil[0].image_path is None
    np.testing.assert_allclose(from_paths[1].anomaly_map, from_pil[1].anomaly_map)


def test_predict_before_fit_is_an_error():
    with pytest.raises(RuntimeError, match="fit"):
        fake_detector().predict(_images(1))


def test_switching_a_branch_off_leaves_its_maps_zero():
    config = load_preset("tiny").replace(output_size=32, use_diffusion=False)
    det = CLIPFusion(config, clip=FakeBranch("clip"))
    assert det.diffusion is None
    [result] = det.fit("bottle").predict(_images(1))
    assert not result.maps["diff_L"].any()
    expected = config.alpha_map * result.maps["clip_L"]
    np.testing.assert_allclose(result.anomaly_map, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"alpha_map": 1.5}, "alpha_map must lie in"),
        ({"sigma": -1.0}, "sigma must be"),
        ({"score_mode": "mean"}, "score_mode must be one of"),
        ({"use_clip": False, "use_diffusion": False}, "nothing would be computed"),
    ],
)
def test_invalid_fusion_options_are_refused_before_loading(overrides, message):
    # refused where the configuration is made, so no detector (and no model) is ever built from it
    with pytest.raises(ConfigError, match=message):
        load_preset("tiny").replace(**overrides)


def test_from_preset_accepts_branch_overrides_with_double_underscores(monkeypatch):
    built = {}

    class Recorder:
        @classmethod
        def from_config(cls, cfg, **_loading):
            built["clip"] = cfg
            return FakeBranch("clip")

    monkeypatch.setattr("clipfusion.branches.patchclip.PatchCLIP", Recorder, raising=False)
    det = CLIPFusion.from_preset("tiny", clip__patch_mode="crops", use_diffusion=False, alpha_map=0.5)
    assert built["clip"].patch_mode == "crops"
    # the branch is built with the placement it inherits from the top of the configuration
    assert (built["clip"].device, built["clip"].dtype, built["clip"].output_size) == ("auto", "float32", 64)
    assert det.config.alpha_map == 0.5


def test_mask_thresholds_the_fused_map():
    result = AnomalyResult(score=0.5, anomaly_map=np.array([[0.1, 0.9]], dtype=np.float32), maps={})
    assert result.mask(0.5).tolist() == [[False, True]]
    assert result.mask(0.05).tolist() == [[True, True]] and not result.mask(0.9).any()


class _OomAbove(FakeBranch):
    """Runs out of memory on batches larger than ``limit`` images, like a GPU would."""

    def __init__(self, kind, limit):
        super().__init__(kind)
        self.limit = limit

    def _predict_batch(self, images):
        if len(images) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super()._predict_batch(images)


def test_out_of_memory_halves_the_batch_and_gives_the_same_results():
    config = load_preset("tiny").replace(output_size=32)
    det = CLIPFusion(config, clip=_OomAbove("clip", limit=2), diffusion=FakeBranch("diffusion"))
    images = _images(5, seed=6)
    with pytest.warns(UserWarning, match="retrying with batch size 2"):
        results = det.fit("bottle").predict(images, batch_size=8)
    expected = fake_detector(config).fit("bottle").predict(images, batch_size=8)
    assert len(results) == 5
    for a, b in zip(results, expected, strict=True):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)


def test_out_of_memory_at_one_image_is_a_clear_error():
    from clipfusion.errors import ClipfusionError

    det = CLIPFusion(load_preset("tiny"), clip=_OomAbove("clip", limit=0), diffusion=FakeBranch("diffusion"))
    with (
        pytest.raises(ClipfusionError, match="out of memory with one image per batch"),
        pytest.warns(UserWarning),
    ):
        det.fit("bottle").predict(_images(2), batch_size=2)


def test_the_detector_batch_size_caps_the_branch_batches_for_the_call():
    det = CLIPFusion.from_preset("tiny", use_diffusion=False)
    assert det.clip.config.batch_size == 8
    seen = []
    original = det.clip.features
    det.clip.features = lambda imgs: seen.append(len(imgs)) or original(imgs)
    det.fit("bottle").predict(_images(3), batch_size=2)
    assert seen == [2, 1] and det.clip.config.batch_size == 8


def test_released_text_encoders_free_memory_and_keep_prepared_objects_working():
    # bit for bit without the UNet's precomputed conditioning (tests/branches/test_conditioning.py: the
    # same maps to rounding at a batch above one)
    det = CLIPFusion.from_preset("tiny", diffusion__precompute_conditioning=False)
    refs, queries = _images(1, 1), _images(2, 2)
    before = det.fit("bottle", refs).predict(queries)
    n_params = sum(p.numel() for p in det.clip.model.parameters())
    det.prepare(["metal_nut"]).release_text_encoders()
    assert sum(p.numel() for p in det.clip.model.parameters()) < n_params
    assert det.diffusion.text_encoder is None
    # the tokenizers go too (open_clip's BPE tables are ~40 MB of Python objects); prompts stay cached
    assert det.clip.tokenizer is None and det.diffusion.tokenizer is None
    after = det.fit("bottle", refs).predict(queries)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    det.fit("metal nut", refs)  # prepared before the release
    with pytest.raises(ClipfusionError, match="released"):
        det.fit("screw", refs)


def test_objects_known_before_loading_are_encoded_and_their_text_encoders_freed_before_the_image_models(
    monkeypatch,
):
    """`CLIPFusion(objects=...)` (what the command line does): the same answers as fit + release, and no
    text encoder is alive when the VAE and the UNet load, so the two never add up at the peak."""
    import weakref

    import clipfusion.models.diffusion as diffusion

    loads, alive = [], []
    original = diffusion.load_diffusion_components

    def recording(config, **kwargs):
        parts = original(config, **kwargs)
        if kwargs.get("image_models", True):
            # every text encoder loaded before must be gone by the time the image models exist
            alive.append([ref() is not None for ref in loads])
        elif parts.text_encoder is not None:
            loads.append(weakref.ref(parts.text_encoder))
        return parts

    monkeypatch.setattr(diffusion, "load_diffusion_components", recording)
    refs, queries = _images(1, 1), _images(2, 2)
    # bit for bit without the UNet's precomputed conditioning (tests/branches/test_conditioning.py)
    exact = {"diffusion__precompute_conditioning": False}
    staged = CLIPFusion.from_preset("tiny", objects=["metal_nut", "bottle"], **exact)
    assert len(loads) == 1 and alive == [[False]]
    assert staged.clip.text_encoder_released and staged.clip.tokenizer is None
    assert staged.diffusion.text_encoder is None and staged.diffusion.tokenizer is None
    staged_maps = [r.anomaly_map for r in staged.fit("metal nut", refs).predict(queries)]

    plain = CLIPFusion.from_preset("tiny", **exact)
    assert plain.diffusion.text_encoder is not None and alive[-1] == [False]
    plain_maps = [r.anomaly_map for r in plain.fit("metal nut", refs).predict(queries)]
    for a, b in zip(staged_maps, plain_maps, strict=True):
        np.testing.assert_array_equal(a, b)
    staged.fit("bottle")  # the second name is prepared too
    with pytest.raises(ClipfusionError, match="objects"):
        staged.fit("screw", refs)
    with pytest.raises(ConfigError, match="text encoders"):
        CLIPFusion(load_preset("tiny"), objects=["bottle"], text_encoders=False)


def test_objects_prepare_and_release_branches_given_ready_made():
    det = CLIPFusion.from_preset("tiny")
    twin = CLIPFusion(det.config, clip=det.clip, diffusion=det.diffusion, objects=["cable"])
    assert twin.diffusion.text_encoder is None and twin.clip.text_encoder_released
    twin.fit("cable")
    with pytest.raises(ClipfusionError, match="released"):
        twin.fit("screw")


def test_results_carry_the_native_maps_the_fusion_resized():
    from clipfusion.fusion import fuse_components

    config = load_preset("tiny").replace(output_size=32)
    det = CLIPFusion(config, clip=FakeBranch("clip", 24), diffusion=FakeBranch("diffusion", 24))
    det.fit("bottle", _images(2, seed=1))
    images = _images(3, seed=2)
    results = det.predict(images)
    assert set(results[0].native_maps) == {"clip_L", "clip_V", "diff_L", "diff_V"}
    assert results[0].native_maps["clip_L"].shape == (24, 24) and results[0].anomaly_map.shape == (32, 32)
    components = {
        k: torch.from_numpy(np.stack([r.native_maps[k] for r in results])) for k in results[0].native_maps
    }
    components["s_clip_L"] = torch.tensor([r.s_clip_L for r in results])
    fused, score, _ = fuse_components(components, config)
    for i, result in enumerate(results):
        assert np.array_equal(result.anomaly_map, fused[i].numpy()) and result.score == float(score[i])


def test_terms_leave_maps_out_of_the_fusion():
    det = CLIPFusion(
        load_preset("tiny").replace(output_size=32, terms=["clip_L", "diff_L"]),
        clip=FakeBranch("clip", 32),
        diffusion=FakeBranch("diffusion", 32),
    )
    [result] = det.fit("bottle", _images(2, seed=1)).predict(_images(1, seed=3))
    assert result.native_maps["clip_V"].any()  # computed, but not fused
    assert not result.maps["clip_V"].any() and not result.maps["diff_V"].any()
    zero_shot = CLIPFusion(
        load_preset("tiny").replace(output_size=32, terms=["clip_V"]),
        clip=FakeBranch("clip", 32),
        diffusion=FakeBranch("diffusion", 32),
    ).fit("bottle")
    with pytest.raises(ConfigError, match="terms clip_V: none of these maps is computed here"):
        zero_shot.predict(_images(1))


def test_the_run_records_what_auto_resolved_to(tmp_path):
    from clipfusion.config import load_config

    det = CLIPFusion.from_preset("tiny", device="cpu", dtype="auto")
    record = det.resolved
    assert record["clip"]["device"] == "cpu" and record["clip"]["dtype"] == str(det.clip.dtype)[6:]
    assert record["diffusion"]["dtype"] == str(det.diffusion.dtype)[6:] and "auto_dtype" in record
    path = det.save_config(tmp_path / "config.json")
    saved = json.loads(path.read_text())
    assert saved["dtype"] == "auto" and saved["resolved"] == record  # both: what was asked, what it became
    assert load_config(path) == det.config
    fake = fake_detector()  # injected branches without a dtype: the configuration's resolution
    assert set(fake.resolved) >= {"clip", "diffusion"}


def test_bfloat16_maps_and_scores_follow_float32():
    """Everything after the models is float32 (attention probabilities, distances, maps, smoothing, fusion),
    so bfloat16 weights move the outputs only by their own rounding."""
    refs, queries = _images(2, 21, 96), _images(3, 22, 96)
    fp32 = CLIPFusion.from_preset("tiny", device="cpu", dtype="float32").fit("screw", refs).predict(queries)
    bf16 = CLIPFusion.from_preset("tiny", device="cpu", dtype="bfloat16").fit("screw", refs).predict(queries)
    for name in ("clip_L", "clip_V", "diff_L", "diff_V"):
        a = np.stack([r.maps[name] for r in fp32])
        b = np.stack([r.maps[name] for r in bf16])
        assert b.dtype == np.float32 and np.isfinite(b).all()
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99, name
    fused_a = np.stack([r.anomaly_map for r in fp32])
    fused_b = np.stack([r.anomaly_map for r in bf16])
    # what `auto` may pick on a CPU with fast bfloat16: the fused map it answers with follows float32 to
    # Pearson 0.999 (the language maps too; the tiny models' narrow features round more than the full ones)
    assert np.corrcoef(fused_a.ravel(), fused_b.ravel())[0, 1] >= 0.999
    for name in ("clip_L", "clip_V", "diff_L"):
        a, b = (np.stack([r.maps[name] for r in run]) for run in (fp32, bf16))
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.999, name
    scores = np.array([[a.score, b.score] for a, b in zip(fp32, bf16, strict=True)])
    assert np.corrcoef(scores.T)[0, 1] >= 0.99


def test_branches_are_known_by_the_protocol_alone():
    from clipfusion.branches import Branch

    det = CLIPFusion.from_preset("tiny")
    assert [b.name for b in det.branches] == ["clip", "diffusion"]
    assert all(isinstance(b, Branch) for b in (*det.branches, FakeBranch("clip")))
    with pytest.raises(ConfigError, match="does not implement clipfusion.branches.Branch"):
        CLIPFusion(load_preset("tiny"), clip=object(), diffusion=FakeBranch("diffusion"))


def test_building_and_running_a_detector_leaves_the_environment_alone(tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = dict(os.environ)
    det = CLIPFusion.from_preset("tiny", weights_dir=tmp_path)
    det.fit("bottle", _images(1)).predict(_images(1))
    assert dict(os.environ) == before


def test_a_branch_section_overrides_the_placement_it_inherits():
    det = CLIPFusion.from_preset("tiny", **{"diffusion.dtype": "bfloat16"})
    assert det.config.dtype == "float32"
    assert det.clip.dtype == torch.float32 and det.diffusion.dtype == torch.bfloat16
    [result] = det.fit("bottle").predict(_images(1))
    assert result.anomaly_map.dtype == np.float32


def _as_tensor(images):
    return torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 for img in images])


def test_a_tensor_batch_gives_the_answer_of_the_same_pil_images():
    # 32 px images: the fake branches' own size, so neither path resizes and the pixels are the same
    refs, images = _images(2, seed=7, size=32), _images(5, seed=8, size=32)
    det = fake_detector()
    from_pil = det.fit("bottle", refs).predict(images)
    det.clip.batches.clear()
    from_tensor = det.fit("bottle", _as_tensor(refs)).predict(_as_tensor(images), batch_size=2)
    assert det.references == ["<image 0>", "<image 1>"] and det.clip.shots == 2
    assert det.clip.batches == [2, 2, 1]  # the batch size splits a tensor as it splits a list
    assert len(from_tensor) == 5 and all(r.image_path is None for r in from_tensor)
    for a, b in zip(from_pil, from_tensor, strict=True):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
        assert a.score == pytest.approx(b.score, abs=1e-6)
    [single] = det.predict(_as_tensor(images[:1])[0])  # one (3, H, W) image
    np.testing.assert_allclose(single.anomaly_map, from_pil[0].anomaly_map, atol=1e-6)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: (t * 255).to(torch.uint8), "expected a float"),
        (lambda t: t[:, :1], "expected a float"),
        (lambda t: t * 255, "pixel values span"),
        (lambda t: (t - 0.45) / 0.22, "pixel values span"),  # mean/std-normalised: not [0, 1]
        (lambda t: t.masked_fill(t > 0.9, float("nan")), "pixel values span"),
        (lambda t: t[..., :16, :16], "too small"),
    ],
)
def test_tensors_that_are_not_rgb_pixels_in_0_1_are_refused(make, message):
    det = fake_detector().fit("bottle")
    with pytest.raises(ClipfusionError, match=message):
        det.predict(make(_as_tensor(_images(2, seed=9))))


def test_a_bicubic_overshoot_just_outside_0_1_is_clipped_as_pil_clips():
    images = _as_tensor(_images(2, seed=10, size=32))
    det = fake_detector().fit("bottle")
    overshoot = images.clone()
    overshoot[0, 0, 0, 0], overshoot[1, 1, 2, 3] = 1.04, -0.03
    clipped = overshoot.clamp(0, 1)
    for a, b in zip(det.predict(overshoot), det.predict(clipped), strict=True):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_large_blocks_are_mapped_before_the_models_load_and_only_when_it_loads_them(monkeypatch):
    """The heap holes the freed text encoders leave must not exist (runtime.map_large_blocks): the
    threshold is set before the first weight is allocated, and not by a detector given its branches."""
    import clipfusion.branches.patchclip as patchclip
    import clipfusion.detector as detector

    events = []
    monkeypatch.setattr(detector, "map_large_blocks", lambda: events.append("map") or True)
    original = patchclip.PatchCLIP.from_config.__func__
    monkeypatch.setattr(
        patchclip.PatchCLIP,
        "from_config",
        classmethod(lambda cls, *a, **k: events.append("load clip") or original(cls, *a, **k)),
    )
    CLIPFusion.from_preset("tiny")
    assert events[:2] == ["map", "load clip"]
    events.clear()
    CLIPFusion(load_preset("tiny"), clip=FakeBranch("clip", 8), diffusion=FakeBranch("diffusion", 8))
    assert events == []
