"""PatchCLIP with the tiny preset: shapes, determinism, batching, caching, modes, options, plumbing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from clipfusion.branches.patchclip import PatchCLIP, harmonic_aggregation, pixel_statistics
from clipfusion.config import with_overrides
from clipfusion.errors import ClipfusionError, ConfigError, InputError

S = 64  # the tiny preset's output size


def _images(n: int, seed: int = 0, size: tuple[int, int] = (96, 96)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny() -> PatchCLIP:
    """One tiny CLIP model for the module; tests that need other options take a :func:`variant` of it."""
    return PatchCLIP.from_preset("tiny", device="cpu")


def variant(branch: PatchCLIP, **options) -> PatchCLIP:
    """A fresh branch (own text cache and memory bank) on the same model, with some options changed; not
    for dtype or device, which would cast the shared model in place."""
    assert not {"dtype", "device"} & set(options)
    return PatchCLIP(branch.model, branch.tokenizer, with_overrides(branch.config, options))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return _images(3, seed=1)


@pytest.fixture(scope="module")
def references() -> list[Image.Image]:
    return _images(2, seed=2, size=(80, 120))


def test_zero_shot_shapes_and_dtypes(tiny, images):
    clip = variant(tiny).fit("bottle")
    out = clip.predict(images)
    assert set(out) == {"clip_L", "s_clip_L"}  # zero-shot: no memory bank, no clip_V
    assert out["clip_L"].shape == (3, S, S) and out["s_clip_L"].shape == (3,)
    for value in out.values():
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        assert torch.isfinite(value).all()
    assert out["clip_L"].min() >= 0 and out["clip_L"].max() <= 1
    assert out["s_clip_L"].min() > 0 and out["s_clip_L"].max() < 1


def test_few_shot_adds_clip_v_and_refit_drops_it(tiny, images, references):
    clip = variant(tiny).fit("bottle", references)
    out = clip.predict(images)
    assert out["clip_V"].shape == (3, S, S) and out["clip_V"].dtype == torch.float32
    assert clip.memory_bank.shape == (2 * 15 * 15, 256)  # pre-projection tokens of the tiny ViT
    assert out["clip_V"].min() >= 0 and out["clip_V"].max() > 0
    # a reference is its own nearest neighbour: distance ~ 0 everywhere
    own = clip.predict(references[:1])["clip_V"]
    assert own.abs().max() < 1e-4
    assert "clip_V" not in clip.fit("bottle").predict(images)


@pytest.mark.parametrize("mode", ["tokens", "windows", "crops"])
def test_each_patch_mode(tiny, mode, images, references):
    clip = variant(tiny, patch_mode=mode).fit("screw", references)
    out = clip.predict(images)
    assert out["clip_L"].shape == (3, S, S) and out["clip_V"].shape == (3, S, S)
    assert out["clip_L"].min() >= 0 and out["clip_L"].max() <= 1
    assert torch.isfinite(out["clip_V"]).all() and out["clip_V"].min() >= 0
    assert out["clip_L"].std() > 0  # a map, not a constant


def test_modes_reduce_to_the_global_embedding(tiny, images):
    # a window covering the whole grid, or a single crop, is the whole image
    clip = variant(tiny, patch_mode="windows", window_size=15)
    with torch.inference_mode():
        encoded = clip.encode(clip.preprocess(images), keep_embedded=True)
        window = clip.window_embeddings(encoded.embedded)
    assert window.shape[1] == 1
    torch.testing.assert_close(window[:, 0], encoded.image, rtol=0, atol=1e-5)
    crops = variant(tiny, patch_mode="crops", crop_grid=1).fit("bottle")
    out = crops.predict(images)
    torch.testing.assert_close(
        out["clip_L"], out["s_clip_L"].view(-1, 1, 1).expand(-1, S, S), atol=1e-5, rtol=0
    )


def test_encode_equals_open_clip_encode_image(tiny, images):
    clip = tiny
    pixels = clip.preprocess(images)
    with torch.inference_mode():
        assert torch.equal(clip.encode(pixels).image, clip.model.encode_image(pixels))


def test_same_seed_same_outputs_other_seed_other_outputs(images, references):
    outs = [PatchCLIP.from_preset("tiny").fit("bottle", references).predict(images) for _ in range(2)]
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key
    other = PatchCLIP.from_preset("tiny", init_seed=1).fit("bottle", references).predict(images)
    assert not torch.allclose(outs[0]["clip_L"], other["clip_L"])


@pytest.mark.parametrize("mode", ["tokens", "windows"])
def test_batch_size_does_not_change_results(tiny, mode, images, references):
    one = variant(tiny, patch_mode=mode, batch_size=1).fit("bottle", references)
    three = variant(tiny, patch_mode=mode, batch_size=3).fit("bottle", references)
    a, b = one.predict(images), three.predict(images)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


def test_text_features_are_normalised_and_cached(tiny, monkeypatch, references):
    clip = variant(tiny)
    calls = []
    encode_text = clip.model.encode_text
    monkeypatch.setattr(
        clip.model, "encode_text", lambda tokens: calls.append(len(tokens)) or encode_text(tokens)
    )
    text = clip.text_features("bottle")
    assert text.shape == (2, 64) and text.dtype == torch.float32
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert calls == [147, 84]  # normal ensemble, then anomalous ensemble
    assert clip.text_features("bottle") is text
    clip.fit("bottle", references)
    clip.fit("bottle")
    assert len(calls) == 2  # cached across fits
    other = clip.text_features("metal nut")
    assert len(calls) == 4 and not torch.allclose(other, text)


def test_normalised_prompt_averaging_is_an_option(tiny):
    raw = variant(tiny).text_features("bottle")
    normed = variant(tiny, normalize_prompt_embeddings=True).text_features("bottle")
    assert not torch.allclose(raw, normed)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(2))


def test_bfloat16_runs_and_follows_float32(tiny, images, references):
    full = variant(tiny).fit("bottle", references).predict(images)
    half = PatchCLIP.from_preset("tiny", dtype="bfloat16").fit("bottle", references).predict(images)
    assert set(half) == set(full)
    for key in ("clip_L", "clip_V"):
        assert half[key].dtype == torch.float32
        corr = np.corrcoef(full[key].flatten().numpy(), half[key].flatten().numpy())[0, 1]
        assert corr > 0.95, (key, corr)


@pytest.mark.parametrize(
    "options",
    [
        {"patch_mode": "pixels"},
        {"crop_grid": 0},
        {"window_size": 0},
        {"temperature": 0.0},
        {"batch_size": 0},
        {"output_size": -1},
        {"no_such_option": 1},
        {"dtype": "float16"},  # float16 is CUDA-only
        {"patch_mode": "windows", "window_size": 16},  # larger than the 15×15 token grid
        {"image_size": 224},  # the tiny ViT's positional embedding is for 240 px
        {"model": "no-such-architecture"},
        {"model": "hf-hub:timm/vit_base_patch16_plus_clip_240.laion400m_e31"},  # would reach the hub
        {"weights": "pretrained", "checkpoint": "no-such-tag"},
        {"weights": "downloaded"},
        {"distance": "manhattan"},
    ],
)
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        PatchCLIP.from_preset("tiny", **options)


def test_bad_calls_are_clear_errors(tiny, images):
    clip = variant(tiny)
    with pytest.raises(ClipfusionError, match="before fit"):
        clip.predict(images)
    with pytest.raises(InputError):
        clip.fit("")
    clip.fit("bottle")
    with pytest.raises(InputError, match="PIL"):
        clip.predict([np.zeros((8, 8, 3))])
    with pytest.raises(InputError, match="list"):
        clip.predict(images[0])
    empty = clip.predict([])
    assert empty["clip_L"].shape == (0, S, S) and empty["s_clip_L"].shape == (0,)


def test_preprocessing_is_open_clips_for_square_images(tiny):
    """Bicubic resize to 240 and CLIP mean/std, identical to open_clip's eval transform for the model."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    clip = tiny
    reference = image_transform_v2(PreprocessCfg(**clip.model.visual.preprocess_cfg), is_train=False)
    # WinCLIP's (and the paper's) statistics: OpenAI CLIP's, which open_clip records for this model
    assert pixel_statistics(clip.model) == (
        (0.48145466, 0.4578275, 0.40821073),
        (0.26862954, 0.26130258, 0.27577711),
    )
    assert clip.model.visual.preprocess_cfg["interpolation"] == "bicubic"
    for size in (64, 240, 333):
        image = _images(1, seed=size, size=(size, size))[0]
        ours = clip.preprocess([image])[0]
        theirs = reference(image)
        assert ours.shape == theirs.shape == (3, 240, 240)
        assert (ours - theirs).abs().max() <= 1e-6, size
    # grey and RGBA inputs become RGB; non-square images are stretched, not cropped
    grey = Image.fromarray(np.full((50, 100), 128, dtype=np.uint8))
    assert clip.preprocess([grey, grey.convert("RGBA")]).shape == (2, 3, 240, 240)


def test_harmonic_aggregation():
    scores = torch.tensor([[1.0, 0.75, 0.5, 0.25]])  # 2×2 windows of size 2 on a 3×3 grid
    expected = torch.tensor([[[1.0, 6 / 7, 0.75], [2 / 3, 0.48, 0.375], [0.5, 1 / 3, 0.25]]])
    torch.testing.assert_close(harmonic_aggregation(scores, (3, 3), 2), expected)
    zero = harmonic_aggregation(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), (3, 3), 2)
    assert zero[0, 0, 0] == 0 and zero[0, 1, 1] == 0 and zero[0, 2, 2] == 1 and torch.isfinite(zero).all()


def test_harmonic_aggregation_matches_anomalib():
    utils = pytest.importorskip("anomalib.models.image.winclip.utils", reason="anomalib (test extra) missing")
    scores = torch.rand(2, 14 * 14, generator=torch.Generator().manual_seed(0)) + 0.01
    theirs = utils.harmonic_aggregation(scores, (15, 15), utils.make_masks((15, 15), 2, 1))
    torch.testing.assert_close(harmonic_aggregation(scores, (15, 15), 2), theirs, rtol=1e-6, atol=1e-6)


def test_few_shot_clip_v_localises_synthetic_defects(tiny, synthetic_root):
    """Plumbing: k = 4 references, random tiny weights; nearest neighbours on pre-projection tokens find
    the synthetic defects (pixel AUROC >= 0.9 in every category)."""
    from clipfusion.data import (
        SYNTHETIC_CATEGORIES,
        FolderDataset,
        load_image,
        load_mask,
        object_name,
        sample_references,
    )
    from clipfusion.metrics import pixel_metrics

    clip = variant(tiny, batch_size=12)
    results = {}
    for category in SYNTHETIC_CATEGORIES:
        train = FolderDataset(synthetic_root / category, "train")
        test = FolderDataset(synthetic_root / category, "test")
        references = [load_image(s.image_path) for s in sample_references(train, 4, seed=0)]
        clip.fit(object_name(category), references)
        maps = clip.predict([load_image(s.image_path) for s in test])["clip_V"].numpy()
        masks = np.stack(
            [
                load_mask(s.mask_path, size=(S, S)) if s.mask_path is not None else np.zeros((S, S), bool)
                for s in test
            ]
        )
        assert masks.any()
        results[category] = pixel_metrics(masks, maps)["auroc"]
    assert min(results.values()) >= 0.9, results


@pytest.mark.parametrize(("mode", "grid"), [("tokens", 15), ("windows", 15), ("crops", 3)])
def test_native_maps_are_the_unit_grid_that_the_output_maps_resize(mode, grid, images, references):
    from clipfusion.maps import resize_maps

    clip = PatchCLIP.from_preset("tiny", patch_mode=mode).fit("screw", references)
    native, resized = clip.predict(images, native=True), clip.predict(images)
    assert native["clip_L"].shape == native["clip_V"].shape == (3, grid, grid)
    for name in ("clip_L", "clip_V"):
        assert torch.equal(resize_maps(native[name], S), resized[name])
    assert torch.equal(native["s_clip_L"], resized["s_clip_L"])
    assert clip.predict([], native=True)["clip_L"].shape == (0, grid, grid)


# -- a batch of [0, 1] float tensors (what anomalib and data loaders hand over) ---------------------------


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    """8-bit images as anomalib reads them: float32 in [0, 1]."""
    return torch.stack(
        [torch.from_numpy(np.array(i.convert("RGB"))).permute(2, 0, 1).float() / 255 for i in images]
    )


@pytest.fixture(scope="module")
def tiny_clip() -> PatchCLIP:
    return PatchCLIP.from_preset("tiny")


def _with_mode(clip: PatchCLIP, mode: str) -> PatchCLIP:
    return PatchCLIP(clip.model, clip.tokenizer, dataclasses.replace(clip.config, patch_mode=mode))


@pytest.mark.parametrize("size", [(96, 96), (300, 200), (240, 240)])
def test_tensor_pixels_equal_pil_pixels_up_to_pils_8_bit_rounding(tiny_clip, size):
    # The tensor path computes PIL's bicubic resize (antialiased, a = -0.5, width then height, clipped after
    # each pass) in float; PIL rounds to 8 bits after each pass: 0.5/255 after the first, carried through the
    # second pass's kernel (sum of |weights| about 1.1 for bicubic), plus 0.5/255 after the second, which
    # bounds the difference by about 1.1/255. At the model's own size there is no resize and no difference.
    images = [*_images(3, seed=3, size=size), _images(1, seed=4, size=size)[0].convert("L").convert("RGB")]
    std = tiny_clip._std
    difference = ((tiny_clip.preprocess(images) - tiny_clip.preprocess(_tensor(images))) * std).abs().max()
    bound = 1e-6 if size == (240, 240) else 1.25 / 255
    assert difference <= bound
    crops = _with_mode(tiny_clip, "crops")
    tiles = (crops.preprocess_crops(images) - crops.preprocess_crops(_tensor(images))) * std
    assert tiles.shape[0] == len(images) * 9 and tiles.abs().max() <= 1.25 / 255  # same tiles, same order


@pytest.mark.parametrize("mode", ["tokens", "windows"])
def test_tensor_batches_give_the_maps_of_the_pil_images(tiny_clip, mode):
    # 240 px: no resize on either path, so the same pixels reach the model (up to float32 rounding of k/255)
    clip = _with_mode(tiny_clip, mode)
    images, refs = _images(3, seed=5, size=(240, 240)), _images(2, seed=6, size=(240, 240))
    from_pil = clip.fit("bottle", refs).predict(images, batch_size=2)
    bank = clip.memory_bank
    from_tensor = clip.fit("bottle", _tensor(refs)).predict(_tensor(images), batch_size=2)
    torch.testing.assert_close(clip.memory_bank, bank, rtol=0, atol=1e-5)
    assert set(from_tensor) == set(from_pil) == {"clip_L", "clip_V", "s_clip_L"}
    for key in from_pil:
        torch.testing.assert_close(from_tensor[key], from_pil[key], rtol=0, atol=1e-5)


def test_tensors_of_the_wrong_shape_or_type_are_refused(tiny_clip):
    clip = tiny_clip.fit("bottle")
    for bad in (
        torch.rand(2, 1, 64, 64),
        torch.rand(3, 64, 64),
        torch.zeros(2, 3, 64, 64, dtype=torch.uint8),
    ):
        with pytest.raises(InputError, match="tensor"):
            clip.predict(bad)
    assert clip.predict(torch.rand(0, 3, 64, 64))["clip_L"].shape == (0, S, S)
