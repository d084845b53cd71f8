"""MapDiff fidelity on the tiny preset: capture, attention, early exit, tokens, determinism, maps, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipfusion.branches.mapdiff import MapDiff, stop_block
from clipfusion.config import load_preset, with_overrides
from clipfusion.errors import ClipfusionError, ConfigError, InputError


@pytest.fixture(scope="module")
def tiny() -> MapDiff:
    return MapDiff.from_preset("tiny", device="cpu")


def variant(branch: MapDiff, **options) -> MapDiff:
    """Another branch on the same (already built) modules with some options changed."""
    config = with_overrides(branch.config, options)
    return MapDiff(branch.vae, branch.unet, branch.text_encoder, branch.tokenizer, branch.scheduler, config)


def images(n: int, seed: int = 0, size: int = 96) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        # smooth random images (blurred noise plus a random square): structured enough to vary the maps
        base = rng.normal(128, 40, (size // 8, size // 8, 3)).clip(0, 255).astype(np.uint8)
        img = np.asarray(Image.fromarray(base).resize((size, size), Image.BICUBIC)).copy()
        y, x = rng.integers(0, size - 20, 2)
        img[y : y + 16, x : x + 16] = rng.integers(0, 255, 3)
        out.append(Image.fromarray(img))
    return out


@pytest.fixture(scope="module")
def batch(tiny: MapDiff) -> dict[str, torch.Tensor]:
    """UNet input and prompt embedding of two images, as predict builds them."""
    z0 = tiny.encode_latents(tiny.preprocess(images(2)))
    return {"sample": tiny.unet_input(z0), "states": tiny.prompt_embeddings("metal nut", "damage")}


def test_stop_block_follows_the_unet_execution_order() -> None:
    layer = "up_blocks.2.attentions.1.transformer_blocks.0.attn2"
    assert stop_block(["up_blocks.1", layer]) == "up_blocks.2"
    assert stop_block(["mid_block.attentions.0", "down_blocks.3"]) == "mid_block"
    assert stop_block(["down_blocks.1", "up_blocks.0.resnets.1"]) == "up_blocks.0"
    assert stop_block(["up_blocks.1", "conv_out"]) is None  # an output layer needs the full pass


@pytest.fixture(scope="module")
def whole() -> MapDiff:
    """The tiny branch loaded for full passes: the same seeded weights, no UNet module dropped."""
    return MapDiff.from_preset("tiny", device="cpu", early_exit=False)


def test_early_exit_gives_the_maps_of_a_full_pass(whole: MapDiff, batch) -> None:
    calls = {"up_blocks.3": 0, "up_blocks.2.upsamplers.0": 0}
    modules = dict(whole.unet.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
        for name in calls
    ]
    try:
        early = whole.run_unet(batch["sample"], batch["states"], early_exit=True)
        # the pass ended at the last captured attention layer: neither the rest of up_blocks.2 nor later ran
        assert calls == {"up_blocks.3": 0, "up_blocks.2.upsamplers.0": 0} and early.noise_pred is None
        full = whole.run_unet(batch["sample"], batch["states"], early_exit=False)
        assert calls == {"up_blocks.3": 1, "up_blocks.2.upsamplers.0": 1} and full.noise_pred is not None
    finally:
        for handle in handles:
            handle.remove()
    assert early.attention.keys() == full.attention.keys() == set(whole.attention_layers)
    for name in full.attention:
        assert torch.equal(early.attention[name], full.attention[name])
    assert early.features.keys() == full.features.keys()
    for name in full.features:
        assert torch.equal(early.features[name], full.features[name])
    refs, queries = images(2, seed=1), images(2, seed=2)
    maps = [variant(whole, early_exit=e).fit("screw", refs).predict(queries) for e in (True, False)]
    for key in ("diff_L", "diff_V"):
        assert torch.equal(maps[0][key], maps[1][key])


def test_unreached_unet_modules_are_dropped_and_the_maps_do_not_change(tiny: MapDiff, whole: MapDiff) -> None:
    # after the blocks, and inside up_blocks.2 what follows its last cross-attention (the last layer read)
    last = "up_blocks.2.attentions.2"
    assert set(tiny.dropped_modules) == {
        "up_blocks.3",
        "conv_norm_out",
        "conv_out",
        f"{last}.transformer_blocks.0.norm3",
        f"{last}.transformer_blocks.0.ff",
        f"{last}.proj_out",
        "up_blocks.2.upsamplers.0",
    }
    assert whole.dropped_modules == []
    kept = sum(p.numel() for p in tiny.unet.parameters())
    assert kept < sum(p.numel() for p in whole.unet.parameters())
    refs, queries = images(2, seed=5), images(2, seed=6)
    dropped = variant(tiny).fit("nut", refs).predict(queries)
    full = variant(whole).fit("nut", refs).predict(queries)  # same seeded weights, whole UNet
    for key in ("diff_L", "diff_V"):
        assert torch.equal(dropped[key], full[key]), key
    with pytest.raises(ConfigError, match="dropped"):  # a full pass needs what was dropped
        variant(tiny, early_exit=False)
    sample = tiny.unet_input(tiny.encode_latents(tiny.preprocess(queries)))
    with pytest.raises(ConfigError, match="dropped"):
        tiny.run_unet(sample, tiny.prompt_embeddings("nut", "damage"), early_exit=False)
    with pytest.raises(ConfigError, match="dropped"):  # a block after the drop cannot be read either
        tiny.run_unet(sample, tiny.prompt_embeddings("nut", "damage"), feature_blocks=["up_blocks.3"])
    with pytest.raises(ConfigError, match="dropped"):  # nor the output of the block it stops in
        tiny.run_unet(sample, tiny.prompt_embeddings("nut", "damage"), feature_blocks=["up_blocks.2"])
    with pytest.raises(ConfigError, match="dropped"):
        variant(tiny, feature_blocks=("up_blocks.2",))
    # a pass that stops earlier is fine: attention of up_blocks.1 only, features of up_blocks.0
    variant(tiny, attention_blocks=("up_blocks.1",), feature_blocks=("up_blocks.0",)).fit("nut", refs)


def test_inplace_activations_give_the_same_latents(tiny: MapDiff) -> None:
    import copy

    from clipfusion.branches.mapdiff import use_inplace_activations

    silus = [m for m in tiny.vae.encoder.modules() if isinstance(m, torch.nn.SiLU)]
    assert silus and all(m.inplace for m in silus)  # switched on when the branch was loaded
    plain_vae = copy.deepcopy(tiny.vae)
    for module in plain_vae.encoder.modules():
        if isinstance(module, torch.nn.SiLU):
            module.inplace = False
    plain = MapDiff(plain_vae, tiny.unet, tiny.text_encoder, tiny.tokenizer, tiny.scheduler, tiny.config)
    pixels = tiny.preprocess(images(2, seed=7))
    assert torch.equal(tiny.encode_latents(pixels), plain.encode_latents(pixels))
    assert use_inplace_activations(plain_vae.encoder) == len(silus)


def test_state_word_positions_single_token(tiny: MapDiff) -> None:
    prompt = tiny.tokenize_prompt("metal nut", "damage")
    ids = prompt.input_ids[0].tolist()
    word = tiny.tokenizer("damage", add_special_tokens=False).input_ids
    assert prompt.text == "a close-up cropped png photo of a metal nut with damage"
    assert len(word) == 1
    assert prompt.state_positions == (prompt.end_position - 1,)  # last word, just before the end token
    assert [ids[p] for p in prompt.state_positions] == word
    assert ids[0] == 49406 and ids[prompt.end_position] == 49407


@pytest.mark.parametrize("state", ["discolouration", "contamination damage"])
def test_state_word_positions_multi_token(tiny: MapDiff, state: str) -> None:
    word = tiny.tokenizer(state, add_special_tokens=False).input_ids
    assert len(word) > 1  # the point of this test: CLIP's BPE splits these
    for obj in ("screw", "chewinggum"):  # objects of one and of several tokens shift the positions
        prompt = tiny.tokenize_prompt(obj, state)
        ids = prompt.input_ids[0].tolist()
        first = prompt.state_positions[0]
        assert prompt.state_positions == tuple(range(first, first + len(word)))
        assert [ids[p] for p in prompt.state_positions] == word
        assert prompt.state_positions[-1] == prompt.end_position - 1
        assert tiny.tokenizer.decode([ids[p] for p in prompt.state_positions]) == state


def test_state_word_inside_the_template(tiny: MapDiff) -> None:
    branch = variant(tiny, prompt_template="{state} on a {object}, close-up")
    prompt = branch.tokenize_prompt("pipe fryum", "discolouration")
    assert prompt.state_positions == (1, 2, 3, 4)
    glued = variant(tiny, prompt_template="a photo of a {object} with {state}ed parts")
    with pytest.raises(ConfigError, match="state word"):  # "damaged" is one token, not "damage" + "ed"
        glued.tokenize_prompt("screw", "damage")


def test_prompt_embeddings_are_cached_and_text_encoder_can_be_released(tiny: MapDiff) -> None:
    branch = variant(tiny, precompute_conditioning=False)  # on the fixture's UNet, which other tests share
    branch.fit("hazelnut", [])
    cached = branch.prompt_embeddings("hazelnut", "damage")
    assert cached.shape == (1, 77, tiny.unet.config.cross_attention_dim)
    tokens = branch.tokenize_prompt("hazelnut", "damage")
    branch.release_text_encoder()
    assert branch.text_encoder is None and branch.tokenizer is None
    assert branch.tokenize_prompt("hazelnut", "damage") is tokens  # cached with the embeddings
    assert branch.prompt_embeddings("hazelnut", "damage") is cached
    out = branch.fit("hazelnut", []).predict(images(1))
    assert "diff_L" in out
    with pytest.raises(ClipfusionError, match="released"):
        branch.fit("carpet", [])


def test_zero_shot_and_few_shot_outputs(tiny: MapDiff) -> None:
    branch = variant(tiny)
    size = branch.config.output_size
    zero = branch.fit("bottle", []).predict(images(3))
    assert set(zero) == {"diff_L"}
    assert zero["diff_L"].shape == (3, size, size) and zero["diff_L"].dtype == torch.float32
    assert float(zero["diff_L"].min()) >= 0.0 and float(zero["diff_L"].max()) <= 1.0
    assert float(zero["diff_L"].std()) > 0
    few = branch.fit("bottle", images(2, seed=5)).predict(images(3))
    assert set(few) == {"diff_L", "diff_V"} and branch.shots == 2
    assert few["diff_V"].shape == (3, size, size) and few["diff_V"].dtype == torch.float32
    assert float(few["diff_V"].min()) >= 0.0 and float(few["diff_V"].std()) > 0
    torch.testing.assert_close(few["diff_L"], zero["diff_L"])  # the bank does not touch the language map
    # a reference is at distance ~0 from itself: the same noise and prompt give the same features
    itself = branch.predict(images(2, seed=5))["diff_V"]
    assert float(itself.abs().max()) < 1e-4


def test_normalisers_bound_and_order_the_maps(tiny: MapDiff) -> None:
    queries = images(2)
    maps = {
        m: variant(tiny, attention_normaliser=m).fit("tile", []).predict(queries)["diff_L"]
        for m in ("words", "prompt", "sequence")
    }
    # the normalising sets are nested (words ⊂ words + end token ⊂ every position after the start token)
    assert torch.all(maps["words"] >= maps["prompt"] - 1e-6)
    assert torch.all(maps["prompt"] >= maps["sequence"] - 1e-6)
    assert all(float(m.max()) <= 1.0 for m in maps.values())


def test_euclidean_distance_changes_diff_v_only(tiny: MapDiff) -> None:
    from clipfusion.branches.memory import nearest_neighbour_distance

    refs, queries = images(1, seed=7), images(2, seed=8)
    cosine = variant(tiny, distance="cosine").fit("tile", refs)
    euclid = variant(tiny, distance="euclidean").fit("tile", refs)
    a, b = cosine.predict(queries), euclid.predict(queries)
    torch.testing.assert_close(a["diff_L"], b["diff_L"])
    assert not torch.allclose(a["diff_V"], b["diff_V"])
    # diff_V is the euclidean distance of the block features to the bank, resized to the output size
    block = euclid.config.feature_blocks[0]
    pixels = euclid.preprocess(queries)
    capture = euclid.run_unet(
        euclid.unet_input(euclid.encode_latents(pixels)), euclid.prompt_embeddings("tile", "damage")
    )
    raw = nearest_neighbour_distance(
        capture.features[block].permute(0, 2, 3, 1),
        euclid.memory_bank[("damage", 0)][block],
        distance="euclidean",
    )
    from clipfusion.maps import resize_maps

    torch.testing.assert_close(b["diff_V"], resize_maps(raw, euclid.config.output_size), atol=1e-5, rtol=1e-5)


def test_deterministic_and_independent_of_batch_size(tiny: MapDiff) -> None:
    refs, queries = images(2, seed=3), images(3, seed=4)
    one = variant(tiny, batch_size=1).fit("cable", refs).predict(queries)
    again = variant(tiny, batch_size=1).fit("cable", refs).predict(queries)
    two = variant(tiny, batch_size=2).fit("cable", refs).predict(queries)  # batches of 2 and 1
    for key in ("diff_L", "diff_V"):
        assert torch.equal(one[key], again[key])
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)


def test_state_words_are_averaged(tiny: MapDiff) -> None:
    queries = images(2)
    single = [
        variant(tiny, state_words=[w]).fit("wood", []).predict(queries)["diff_L"] for w in ("damage", "flaw")
    ]
    both = variant(tiny, state_words=["damage", "flaw"]).fit("wood", []).predict(queries)["diff_L"]
    torch.testing.assert_close(both, (single[0] + single[1]) / 2, rtol=1e-5, atol=1e-6)


def test_noise_draws_are_seeded_and_averaged(tiny: MapDiff) -> None:
    refs, queries = images(1, seed=8), images(1, seed=9)
    two = variant(tiny, n_noise=2).fit("grid", refs).predict(queries)
    other_seed = variant(tiny, n_noise=2, seed=1).fit("grid", refs).predict(queries)
    one = variant(tiny, n_noise=1).fit("grid", refs).predict(queries)
    assert not torch.allclose(two["diff_V"], other_seed["diff_V"])
    assert not torch.allclose(two["diff_V"], one["diff_V"])
    assert float(two["diff_L"].max()) <= 1.0


def test_tensor_and_pil_inputs_agree(tiny: MapDiff) -> None:
    branch = variant(tiny).fit("leather", [])
    size = branch.config.image_size
    pil = [img.resize((size, size), Image.BILINEAR) for img in images(2)]
    tensor = torch.from_numpy(np.stack([np.asarray(i) for i in pil])).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(branch.preprocess(tensor), branch.preprocess(pil))
    torch.testing.assert_close(branch.predict(tensor)["diff_L"], branch.predict(pil)["diff_L"])


def test_predict_before_fit_is_refused(tiny: MapDiff) -> None:
    with pytest.raises(ClipfusionError, match="fit"):
        variant(tiny).predict(images(1))


def test_a_failed_fit_leaves_the_branch_unfitted(tiny: MapDiff) -> None:
    branch = variant(tiny).fit("wood", images(1))
    with pytest.raises(InputError):
        branch.fit("tile", [*images(1), "not an image"])
    assert branch.object_name is None and branch.memory_bank is None and branch.shots == 0
    with pytest.raises(ClipfusionError, match="fit"):
        branch.predict(images(1))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"attention_blocks": ["up_blocks.0"]}, "no cross-attention"),
        ({"attention_blocks": ["up_blocks.9"]}, "no cross-attention"),
        ({"feature_blocks": ["up_blocks.7"]}, "not a module"),
        ({"timestep": 1000}, "timestep"),
        ({"timestep": -1}, "timestep"),
        ({"image_size": 120}, "multiple of 16"),
        ({"n_noise": 0}, "n_noise"),
        ({"state_words": []}, "state_words"),
        ({"state_words": [" "]}, "state_words"),
        ({"prompt_template": "a photo of a {object}"}, "state"),
        ({"prompt_template": "a {thing} with {state}"}, "prompt_template"),
        ({"attention_normaliser": "softmax"}, "attention_normaliser"),
        ({"architecture": "sdxl"}, "architecture"),
        ({"weights": "downloaded"}, "weights"),
        ({"batch_size": 0}, "batch_size"),
        ({"no_such_option": 1}, "unknown option"),
    ],
)
def test_bad_options_are_config_errors(tiny: MapDiff, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        variant(tiny, **options)


def test_from_preset_rejects_float16_on_cpu() -> None:
    with pytest.raises(ConfigError, match="float16"):
        MapDiff.from_preset("tiny", device="cpu", dtype="float16")


def test_paper_defaults_are_those_of_method_md() -> None:
    cfg = load_preset("paper").diffusion
    assert (cfg.image_size, cfg.timestep, cfg.n_noise, cfg.state_words) == (512, 100, 1, ("damage",))
    assert cfg.prompt_template == "a close-up cropped png photo of a {object} with {state}"
    assert cfg.attention_blocks == ("up_blocks.1", "up_blocks.2") and cfg.feature_blocks == ("up_blocks.1",)


def test_bfloat16_maps_follow_float32(tiny: MapDiff) -> None:
    refs, queries = images(2, seed=11), images(2, seed=12)
    reference = variant(tiny).fit("pill", refs).predict(queries)
    bf16 = MapDiff.from_preset("tiny", device="cpu", dtype="bfloat16").fit("pill", refs).predict(queries)
    for key in ("diff_L", "diff_V"):
        assert bf16[key].dtype == torch.float32 and torch.isfinite(bf16[key]).all()
        corr = np.corrcoef(bf16[key].flatten().numpy(), reference[key].flatten().numpy())[0, 1]
        assert corr >= 0.99, (key, corr)


def test_few_shot_random_features_localise_synthetic_defects(tiny: MapDiff, synthetic_root) -> None:
    """k = 4 references from train, the whole test split; pixel AUROC of diff_V per category.

    Random weights know nothing about defects; a nearest-neighbour distance on their features still finds
    regions unlike every reference, if and only if the images, latents, noise, hooks and bank line up.
    """
    from clipfusion.data import SYNTHETIC_CATEGORIES, FolderDataset, load_image, load_mask, sample_references
    from clipfusion.metrics import pixel_metrics

    branch = variant(tiny, batch_size=8)
    size = branch.config.output_size
    scores = {}
    for category in SYNTHETIC_CATEGORIES:
        train = FolderDataset(synthetic_root / category, "train")
        test = FolderDataset(synthetic_root / category, "test")
        references = [load_image(s.image_path) for s in sample_references(train, 4, seed=0)]
        maps = branch.fit(category.replace("_", " "), references).predict(
            [load_image(s.image_path) for s in test]
        )
        masks = np.stack(
            [
                load_mask(s.mask_path, size=(size, size)) if s.mask_path else np.zeros((size, size), bool)
                for s in test
            ]
        )
        assert masks.any() and not masks.all()
        scores[category] = pixel_metrics(masks, maps["diff_V"].numpy())["auroc"]
    assert min(scores.values()) >= 0.9, scores


def test_mapdiff_drops_the_unused_vae_decoder(tiny: MapDiff) -> None:
    assert tiny.vae.decoder is None
    assert tiny.vae.encoder is not None


def test_channels_last_vae_gives_the_same_maps(tiny: MapDiff) -> None:
    queries, refs = images(2, 3), images(1, 4)
    assert tiny.config.channels_last  # the preset's default
    fast = tiny.fit("bottle", refs).predict(queries)
    plain = (
        MapDiff.from_preset("tiny", device="cpu", channels_last=False).fit("bottle", refs).predict(queries)
    )
    assert fast.keys() == plain.keys()
    for key in fast:
        torch.testing.assert_close(fast[key], plain[key], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compiled_vae_encoder_gives_the_same_latents(tiny: MapDiff) -> None:
    md = variant(tiny, compile=True)  # the same modules, the encoder compiled on first use
    pixels = md.preprocess(images(1, 5))
    compiled = md.encode_latents(pixels)
    plain = tiny.encode_latents(pixels)
    torch.testing.assert_close(compiled, plain, atol=1e-4, rtol=1e-4)


def test_native_maps_are_the_grid_that_the_output_maps_resize(tiny: MapDiff) -> None:
    from clipfusion.maps import resize_maps

    branch = variant(tiny).fit("screw", images(1, seed=4))
    queries = images(3, seed=5)
    native, resized = branch.predict(queries, native=True), branch.predict(queries)
    # tiny: 128 px input, 64×64 latents; up_blocks.2 attention and the up_blocks.1 output are 32×32
    assert native["diff_L"].shape == native["diff_V"].shape == (3, 32, 32)
    for name in ("diff_L", "diff_V"):
        assert torch.equal(resize_maps(native[name], branch.config.output_size), resized[name])


def test_bfloat16_unet_gives_float32_attention_and_maps() -> None:
    branch = MapDiff.from_preset("tiny", device="cpu", dtype="bfloat16")
    assert branch.dtype == torch.bfloat16
    refs, queries = images(1, seed=13), images(1, seed=14)
    branch.fit("gear", refs)
    z0 = branch.encode_latents(branch.preprocess(queries))
    assert z0.dtype == torch.float32  # the latents leave the VAE in float32 (noise is added in float32)
    capture = branch.run_unet(branch.unet_input(z0), branch.prompt_embeddings("gear", "damage"))
    assert {a.dtype for a in capture.attention.values()} == {torch.float32}  # softmax in float32
    assert branch.attention_map(capture, branch.prompts["damage"]).dtype == torch.float32
    bank = branch.memory_bank[("damage", 0)]
    assert branch.feature_distance(capture, bank).dtype == torch.float32
