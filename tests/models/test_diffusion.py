"""Loading the SD-2-inpainting components: shipped configs, seeded random builds, local directories, errors.

Nothing here reaches the network: hub ids are looked up offline in empty caches, and a saved random build
stands in for a downloaded model directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from clipfusion.branches.mapdiff import MapDiff
from clipfusion.config import load_preset
from clipfusion.errors import WeightsUnavailableError
from clipfusion.models.diffusion import (
    SD2Components,
    build_random_components,
    load_diffusion_components,
    load_sd2_inpainting,
    offline_clip_tokenizer,
    save_components,
    shipped_config_dir,
)

SD2 = shipped_config_dir("sd2-inpainting")
TINY = shipped_config_dir("tiny")


def read(root: Path, name: str) -> dict:
    return json.loads((root / name).read_text())


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------------------
# shipped configurations


def test_sd2_unet_config_is_the_published_architecture() -> None:
    from diffusers import UNet2DConditionModel

    unet = read(SD2, "unet/config.json")
    assert unet["in_channels"] == 9 and unet["out_channels"] == 4 and unet["sample_size"] == 64
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["layers_per_block"] == 2 and unet["cross_attention_dim"] == 1024
    assert unet["attention_head_dim"] == [5, 10, 20, 20]
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet["use_linear_projection"] is True and unet["norm_num_groups"] == 32
    assert (unet["flip_sin_to_cos"], unet["freq_shift"], unet["downsample_padding"]) == (True, 0, 1)
    with torch.device("meta"):  # the architecture without allocating its 3.5 GB
        model = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD2 / "unet"))
    assert 865e6 < sum(p.numel() for p in model.parameters()) < 867e6  # "about 866 M parameters"
    modules = dict(model.named_modules())
    for block, heads in (("up_blocks.1", 20), ("up_blocks.2", 10), ("up_blocks.3", 5)):
        attn = modules[f"{block}.attentions.0.transformer_blocks.0.attn2"]
        assert attn.heads == heads and attn.to_q.out_features // heads == 64  # 64 channels per head
        assert attn.to_k.in_features == 1024


def test_sd2_vae_text_encoder_and_scheduler_configs() -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = read(SD2, "vae/config.json")
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["latent_channels"] == 4
    assert vae["scaling_factor"] == 0.18215 and vae["layers_per_block"] == 2
    text = read(SD2, "text_encoder/config.json")
    expected = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-05,
    }
    assert {k: text[k] for k in expected} == expected
    sched = read(SD2, "scheduler/scheduler_config.json")
    assert (sched["num_train_timesteps"], sched["beta_schedule"]) == (1000, "scaled_linear")
    assert (sched["beta_start"], sched["beta_end"]) == (0.00085, 0.012)
    assert sched.get("prediction_type", "epsilon") == "epsilon"
    with torch.device("meta"):
        vae_model = AutoencoderKL.from_config(AutoencoderKL.load_config(SD2 / "vae"))
        text_model = CLIPTextModel(CLIPTextConfig.from_json_file(SD2 / "text_encoder" / "config.json"))
    assert 83e6 < sum(p.numel() for p in vae_model.parameters()) < 84e6
    assert 340e6 < sum(p.numel() for p in text_model.parameters()) < 341e6


def test_tiny_configs_keep_the_sd2_block_structure() -> None:
    tiny, full = read(TINY, "unet/config.json"), read(SD2, "unet/config.json")
    assert tiny["in_channels"] == 9 and tiny["out_channels"] == 4
    for key in ("down_block_types", "up_block_types", "layers_per_block", "use_linear_projection"):
        assert tiny[key] == full[key], key
    assert read(TINY, "text_encoder/config.json")["vocab_size"] == 49408  # the real tokenizer's ids
    assert read(TINY, "text_encoder/config.json")["hidden_size"] == tiny["cross_attention_dim"]


# ---------------------------------------------------------------------------------------------------------
# random builds and the offline tokenizer


def test_random_builds_are_seeded_and_leave_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a = build_random_components("tiny", seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_random_components("tiny", seed=0)
    c = build_random_components("tiny", seed=1)
    for part in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(a, part), getattr(b, part)), part
        assert not same_weights(getattr(a, part), getattr(c, part)), part
    assert a.unet.config.in_channels == 9 and not a.unet.training
    assert not any(p.requires_grad for p in a.unet.parameters())
    assert "random tiny" in a.source


def test_each_random_component_built_alone_has_the_weights_it_has_in_the_whole() -> None:
    whole = build_random_components("tiny", seed=4)
    text = build_random_components("tiny", seed=4, image_models=False)
    images = build_random_components("tiny", seed=4, text_encoder=False)
    assert text.unet is None and text.vae is None and images.text_encoder is None
    assert same_weights(text.text_encoder, whole.text_encoder)
    assert same_weights(images.unet, whole.unet) and same_weights(images.vae, whole.vae)
    assert text.tokenizer("a bottle").input_ids == whole.tokenizer("a bottle").input_ids


def test_random_build_in_bfloat16() -> None:
    parts = build_random_components("tiny", seed=0, dtype=torch.bfloat16)
    assert {p.dtype for m in (parts.unet, parts.vae, parts.text_encoder) for p in m.parameters()} == {
        torch.bfloat16
    }
    # each component is cast as soon as it is built: still the float32 build's weights, rounded
    reference = build_random_components("tiny", seed=0)
    for part in ("unet", "vae", "text_encoder"):
        ours = getattr(parts, part).state_dict()
        for name, value in getattr(reference, part).state_dict().items():
            assert torch.equal(ours[name], value.to(torch.bfloat16)), (part, name)


def test_offline_tokenizer_gives_open_clip_ids() -> None:
    import open_clip

    tokenizer = offline_clip_tokenizer()
    reference = open_clip.get_tokenizer("ViT-H-14")
    texts = [
        "a close-up cropped png photo of a metal nut with damage",
        "a close-up cropped png photo of a printed circuit board with discolouration",
        "a photo of a chewinggum with a flaw, taken at 3 o'clock",
    ]
    for text in texts:
        ids = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == reference([text])[0].tolist(), text
        end = ids.index(49407)
        assert ids[0] == 49406 and set(ids[end + 1 :]) == {0} and len(ids) == 77


# ---------------------------------------------------------------------------------------------------------
# pretrained weights: local directories and unreachable hub ids


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[SD2Components, Path]:
    parts = build_random_components("tiny", seed=3)
    return parts, save_components(parts, tmp_path_factory.mktemp("sd-tiny") / "model")


def test_local_directory_round_trip(saved) -> None:
    parts, folder = saved
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "scheduler/scheduler_config.json",
    } <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files)
    loaded = load_sd2_inpainting(folder, device="cpu")
    assert loaded.source == str(folder)
    for part in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(parts, part), getattr(loaded, part)), part
    text = "a close-up cropped png photo of a zipper with damage"
    assert loaded.tokenizer(text).input_ids == parts.tokenizer(text).input_ids
    assert loaded.tokenizer.pad_token_id == 0
    assert torch.equal(loaded.scheduler.alphas_cumprod, parts.scheduler.alphas_cumprod)
    config = load_preset("tiny").diffusion
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    outputs = [
        MapDiff(**p.modules(), config=config).fit("zipper", x[:1]).predict(x[1:]) for p in (parts, loaded)
    ]
    # the weights are bitwise equal (above); the forward passes agree up to rounding, not bitwise: oneDNN
    # may pick other kernels for differently aligned (memory-mapped) weights on some CPUs
    for key in ("diff_L", "diff_V"):
        torch.testing.assert_close(outputs[0][key], outputs[1][key], atol=1e-6, rtol=1e-5)


def test_a_folder_loads_its_text_encoder_alone_but_checks_every_file_first(saved, tmp_path) -> None:
    import shutil

    parts, folder = saved
    text = load_sd2_inpainting(folder, device="cpu", image_models=False)
    assert text.unet is None and text.vae is None
    assert same_weights(parts.text_encoder, text.text_encoder)
    copy = Path(shutil.copytree(folder, tmp_path / "no-unet"))
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsUnavailableError, match="unet/diffusion_pytorch_model.safetensors"):
        load_sd2_inpainting(copy, image_models=False)


def test_variant_weight_files_are_found(saved, tmp_path) -> None:
    import shutil

    parts, folder = saved
    copy = Path(shutil.copytree(folder, tmp_path / "fp16-named"))
    for weights in copy.rglob("*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    loaded = load_sd2_inpainting(copy, device="cpu")
    assert same_weights(parts.unet, loaded.unet)


def test_incomplete_directory_names_the_missing_files(saved, tmp_path) -> None:
    import shutil

    _, folder = saved
    copy = Path(shutil.copytree(folder, tmp_path / "partial"))
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(WeightsUnavailableError, match="vae/diffusion_pytorch_model.safetensors") as info:
        load_sd2_inpainting(copy)
    assert "tokenizer" in str(info.value)


def test_unknown_hub_id_offline_fails_fast_with_advice(tmp_path) -> None:
    start = time.perf_counter()
    for local_only in (True, None):  # None: the default, offline because HF_HUB_OFFLINE is set
        with pytest.raises(WeightsUnavailableError) as info:
            load_sd2_inpainting(
                "clipfusion-tests/no-such-model", cache_dir=tmp_path, local_files_only=local_only
            )
        message = str(info.value)
        assert "clipfusion-tests/no-such-model" in message and "weights_dir=" in message
        assert "\n" not in message
    assert time.perf_counter() - start < 10


def test_paper_preset_without_weights_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(WeightsUnavailableError, match="stabilityai/stable-diffusion-2-inpainting"):
        load_diffusion_components(load_preset("paper").diffusion, device="cpu", cache_dir=tmp_path)


@pytest.mark.parametrize("model", ["./no/such/folder", "/no/such/folder", "not-an-id"])
def test_missing_directory_is_not_looked_up_on_the_hub(model: str) -> None:
    with pytest.raises(WeightsUnavailableError, match="no such directory"):
        load_sd2_inpainting(model)
