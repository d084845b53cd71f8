"""Cross-attention capture on the tiny UNet: explicit probabilities equal the layer's own, only on
the chosen layers, restored afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipfusion.branches.mapdiff import MapDiff
from clipfusion.branches.mapdiff.attention import (
    AttentionProbabilityProcessor,
    capture_cross_attention,
    cross_attention_layers,
)
from clipfusion.errors import ConfigError


@pytest.fixture(scope="module")
def tiny() -> MapDiff:
    # early_exit=false keeps the whole UNet (a branch loaded for the early exit drops its unreached blocks)
    return MapDiff.from_preset("tiny", device="cpu", early_exit=False)


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


def test_capture_leaves_unet_output_unchanged(tiny: MapDiff, batch) -> None:
    sample, states = batch["sample"], batch["states"].expand(2, -1, -1)
    t = torch.full((2,), tiny.config.timestep)
    with torch.inference_mode():
        plain = tiny.unet(sample, t, encoder_hidden_states=states).sample
        with capture_cross_attention(tiny.unet, tiny.attention_layers) as store:
            captured = tiny.unet(sample, t, encoder_hidden_states=states).sample
    assert set(store) == set(tiny.attention_layers)
    assert plain.abs().max() > 0
    torch.testing.assert_close(captured, plain, rtol=1e-4, atol=1e-5)


def test_stored_attention_equals_recomputation_from_q_and_k(tiny: MapDiff, batch) -> None:
    modules = dict(tiny.unet.named_modules())
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name):
        def hook(module, args, kwargs):
            inputs[name] = (args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"])

        return hook

    handles = [modules[n].register_forward_pre_hook(keep(n), with_kwargs=True) for n in tiny.attention_layers]
    try:
        capture = tiny.run_unet(batch["sample"], batch["states"], early_exit=False)
    finally:
        for h in handles:
            h.remove()
    assert set(capture.attention) == set(tiny.attention_layers) == set(inputs)
    for name in tiny.attention_layers:
        attn = modules[name]
        hidden, context = inputs[name]
        q = attn.to_q(hidden)
        k = attn.to_k(context)
        b, n, width = q.shape
        d = width // attn.heads
        q = q.reshape(b, n, attn.heads, d).permute(0, 2, 1, 3)
        k = k.reshape(b, k.shape[1], attn.heads, d).permute(0, 2, 1, 3)
        expected = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / d**0.5, dim=-1)
        stored = capture.attention[name]
        assert stored.dtype == torch.float32
        assert stored.shape == (b, attn.heads, n, 77)
        torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-6)


def test_processors_installed_only_on_chosen_layers_and_restored(tiny: MapDiff) -> None:
    before = {n: m.processor for n, m in tiny.unet.named_modules() if hasattr(m, "set_processor")}
    chosen = set(tiny.attention_layers)
    with capture_cross_attention(tiny.unet, tiny.attention_layers):
        during = {n: m.processor for n, m in tiny.unet.named_modules() if hasattr(m, "set_processor")}
        for name, processor in during.items():
            if name in chosen:
                assert isinstance(processor, AttentionProbabilityProcessor)
            else:
                assert processor is before[name]  # every other layer keeps its fast kernel
    after = {n: m.processor for n, m in tiny.unet.named_modules() if hasattr(m, "set_processor")}
    assert all(after[n] is before[n] for n in before)
    with pytest.raises(RuntimeError), capture_cross_attention(tiny.unet, tiny.attention_layers):
        raise RuntimeError("interrupted")
    assert all(m.processor is before[n] for n, m in tiny.unet.named_modules() if n in before)


def test_cross_attention_layers_by_prefix(tiny: MapDiff) -> None:
    layers = cross_attention_layers(tiny.unet, ["up_blocks.2", "up_blocks.1"])
    assert layers == tiny.attention_layers  # execution order, whatever the order asked
    assert all(name.endswith(".attn2") for name in layers)
    assert {name.split(".attentions")[0] for name in layers} == {"up_blocks.1", "up_blocks.2"}
    one = cross_attention_layers(tiny.unet, ["up_blocks.1.attentions.0"])
    assert one == ["up_blocks.1.attentions.0.transformer_blocks.0.attn2"]
    with pytest.raises(ConfigError, match="up_blocks.0"):
        cross_attention_layers(tiny.unet, ["up_blocks.0"])
