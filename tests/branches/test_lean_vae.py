"""The lean VAE encoder pass: diffusers' latents bit for bit, with one full-size activation fewer alive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipfusion.branches.lean_vae import encode_moments, lean_encoder_supported, use_inplace_activations
from clipfusion.runtime import process_memory, reset_peak_memory

CONFIGS = Path(__file__).resolve().parents[2] / "src/clipfusion/models/configs"


def vae(config: dict | str, *, channels_last: bool = True, inplace: bool = True):
    from diffusers import AutoencoderKL

    if isinstance(config, str):
        config = json.loads((CONFIGS / config / "vae/config.json").read_text())
    torch.manual_seed(0)
    model = AutoencoderKL.from_config(config).eval()
    model.decoder = None
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if inplace:
        use_inplace_activations(model.encoder)
    return model


#: SD-2's encoder shape (two resnets per block, where diffusers holds five activations; four blocks, so the
#: middle block's attention works at an eighth of the side) at tiny widths
TWO_PER_BLOCK = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [16, 16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "latent_channels": 4,
}


def pixels(n: int, size: int, *, channels_last: bool = True) -> torch.Tensor:
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


#: band every resnet and downsampler, however small / none
BANDED, UNBANDED = 0, 1 << 62


@pytest.mark.parametrize("band_min_bytes", [UNBANDED, BANDED], ids=["unbanded", "banded"])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("config", ["sd-tiny", "sd2-inpainting", "two-per-block"])
def test_the_lean_pass_gives_diffusers_moments(config: str, channels_last: bool, band_min_bytes: int) -> None:
    """Bit for bit unbanded; banded, each value comes from the same kernels and inputs, which is bit for bit
    on the CPUs tested (AVX2, oneDNN) but is checked to rounding: another CPU may pick other kernels for a
    band than for the whole. 72 px: the first block splits into bands of 32, 32 and 8 rows."""
    model = vae(TWO_PER_BLOCK if config == "two-per-block" else config, channels_last=channels_last)
    assert lean_encoder_supported(model)
    x = pixels(2, 72, channels_last=channels_last)
    with torch.inference_mode():
        expected = model.encode(x).latent_dist.parameters
        got = encode_moments(model, x, band_min_bytes=band_min_bytes)
    assert got.shape == expected.shape
    if band_min_bytes == UNBANDED:
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bands_cover_odd_heights_and_bfloat16() -> None:
    model = vae(TWO_PER_BLOCK)
    for size in (66, 130):  # 33 rows after the first downsampler; 130 = four bands, the last of two rows
        x = pixels(1, size)
        with torch.inference_mode():
            expected = model.encode(x).latent_dist.parameters
            torch.testing.assert_close(encode_moments(model, x, band_min_bytes=BANDED), expected)
    model.to(torch.bfloat16)
    x = pixels(1, 72).to(torch.bfloat16)
    with torch.inference_mode():
        expected = model.encode(x).latent_dist.parameters
        got = encode_moments(model, x, band_min_bytes=BANDED)
    torch.testing.assert_close(got, expected)


def test_a_residual_scale_other_than_one_is_divided_as_diffusers_does() -> None:
    model = vae("sd-tiny")
    for module in model.encoder.modules():
        if hasattr(module, "output_scale_factor"):
            module.output_scale_factor = 2.0
    x = pixels(1, 64)
    with torch.inference_mode():
        assert torch.equal(encode_moments(model, x), model.encode(x).latent_dist.parameters)


def test_structures_the_lean_pass_does_not_walk_take_diffusers_forward() -> None:
    from clipfusion.branches.mapdiff import MapDiff

    tiny = MapDiff.from_preset("tiny", device="cpu")
    x = tiny.preprocess(torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1)))
    lean = tiny.encode_latents(x)
    assert lean_encoder_supported(tiny.vae)
    tiny.vae.enable_tiling()  # a tiled encode is not what encode_moments computes
    assert not lean_encoder_supported(tiny.vae)
    tiny.vae.disable_tiling()
    resnet = tiny.vae.encoder.down_blocks[0].resnets[0]
    resnet.time_emb_proj = torch.nn.Linear(4, resnet.conv1.out_channels)  # a resnet the walk does not know
    assert not lean_encoder_supported(tiny.vae)
    resnet.time_emb_proj = None
    assert lean_encoder_supported(tiny.vae)
    assert torch.equal(tiny.encode_latents(x), lean)


def _peak_above(run, x: torch.Tensor) -> float:
    with torch.inference_mode():
        run(x)  # warm-up: oneDNN primitives, allocator
        reset_peak_memory()
        start = process_memory()["rss"]
        run(x)
        return process_memory()["peak_rss"] - start


def test_the_lean_pass_holds_fewer_full_size_activations() -> None:
    """At 1024² with 16 channels one activation is 67 MB (above glibc's mmap threshold, so each one is its
    own mapping and the resident set follows it exactly): diffusers' pass peaks five above the resident set
    (measured), the lean one three, banded two and a quarter (its second normalisation works on one group
    of eight at a time here, a slice and its copy)."""
    if not reset_peak_memory():
        pytest.skip("the kernel's peak-RSS mark cannot be reset here (not Linux)")
    model = vae(TWO_PER_BLOCK)
    x = pixels(1, 1024)
    activation = 16 * 1024 * 1024 * 4
    plain = _peak_above(lambda p: model.encode(p).latent_dist.parameters, x)
    lean = _peak_above(lambda p: encode_moments(model, p, band_min_bytes=UNBANDED), x)
    banded = _peak_above(lambda p: encode_moments(model, p), x)  # 67 MB: banded by default
    ratios = (plain / activation, lean / activation, banded / activation)
    assert lean <= plain - 1.5 * activation, ratios
    assert lean <= 3.25 * activation, ratios
    assert banded <= lean - 0.5 * activation, ratios
    assert banded <= 2.4 * activation, ratios
