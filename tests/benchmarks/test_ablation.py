"""The ablation's variants are detectors of their own on the same modules: no configuration is swapped on a
built branch, no module is changed in place, and what an optimisation computes is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from benchmarks.ablation import VARIANTS, build_variants, classic_attention
from PIL import Image


@pytest.fixture(scope="module")
def base():
    from clipfusion.detector import CLIPFusion

    # as the ablation loads it: the whole UNet, so that the variant without the early exit can run
    return CLIPFusion.from_preset("tiny", device="cpu", diffusion__early_exit=False)


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for _ in range(n)]


def test_variants_are_separate_branches_and_leave_the_shared_modules_alone(base):
    diffusion = base.diffusion
    config, processors = diffusion.config, diffusion.unet.attn_processors
    names = [name for name, _ in VARIANTS if name != "compiled VAE"]
    variants = build_variants(base, names)
    assert variants["no early exit"] is base
    assert variants["default"].diffusion.config.early_exit and not base.diffusion.config.early_exit
    assert variants["default"].diffusion.unet is diffusion.unet  # same weights, another branch object
    plain = variants["no channels-last"].diffusion
    assert plain.vae is not diffusion.vae and not plain.config.channels_last
    assert not plain.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    allocating = variants["out-of-place activations"].diffusion.vae
    assert not any(m.inplace for m in allocating.encoder.modules() if isinstance(m, torch.nn.SiLU))
    # the shared modules kept their state: channels-last, in-place activations, their processors
    assert diffusion.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(m.inplace for m in diffusion.vae.encoder.modules() if isinstance(m, torch.nn.SiLU))
    assert diffusion.config is config
    refs, queries = _images(1), _images(2)
    results = {name: det.fit("cap", refs).predict(queries) for name, det in variants.items()}
    assert {k: type(v) for k, v in diffusion.unet.attn_processors.items()} == {
        k: type(v) for k, v in processors.items()
    }
    for name, out in results.items():
        for a, b in zip(out, results["default"], strict=True):
            np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-5, err_msg=name)
    early = np.stack([r.anomaly_map for r in results["default"]])
    full = np.stack([r.anomaly_map for r in results["no early exit"]])
    assert np.array_equal(early, full)  # the early exit: identical maps


def test_classic_attention_is_installed_for_the_block_only(base):
    unet = base.diffusion.unet
    before = {k: type(v).__name__ for k, v in unet.attn_processors.items()}
    with classic_attention(unet):
        assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor"}
    assert {k: type(v).__name__ for k, v in unet.attn_processors.items()} == before
