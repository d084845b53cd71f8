"""The UNet's conditioning layers replaced by their outputs once the prompts are final."""

from __future__ import annotations

import pytest
import torch

from clipfusion.branches.mapdiff import MapDiff, conditioning
from clipfusion.branches.mapdiff.conditioning import KnownInputs, conditioning_layers
from clipfusion.errors import ClipfusionError, ConfigError

from .test_branch import images

OBJECTS = ["metal nut", "bottle"]


def _branch(**options) -> MapDiff:
    return MapDiff.from_preset("tiny", device="cpu", **options)


@pytest.fixture(scope="module")
def pair() -> tuple[MapDiff, MapDiff]:
    """The same seeded tiny branch twice, fitted with one reference: as loaded, and precomputed on release.

    The tiny preset's text width is 32, under one prompt's 77 tokens, so its keys and values would stay;
    the share is raised so that they are replaced as SD-2's (width 1,024) are.
    """
    refs = images(1, seed=5)
    plain, frozen = _branch(precompute_conditioning=False), _branch()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conditioning, "KEY_VALUE_TABLE_SHARE", 10.0)
        for branch in (plain, frozen):
            branch.prepare(OBJECTS)
            branch.release_text_encoder()
            branch.fit("metal nut", refs)
    return plain, frozen


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_release_replaces_the_timestep_and_prompt_layers_and_frees_their_weights(pair) -> None:
    plain, frozen = pair
    assert plain.precomputed == [] and _n_params(plain.unet) > _n_params(frozen.unet)
    layers = conditioning_layers(plain.unet)
    kinds = {layers[name] for name in frozen.precomputed}
    assert kinds == {"time", "prompt"}
    assert "time_embedding" in frozen.precomputed
    assert any(name.endswith("attn2.to_k") for name in frozen.precomputed)
    freed = sum(_n_params(plain.unet.get_submodule(name)) for name in frozen.precomputed)
    assert _n_params(plain.unet) - _n_params(frozen.unet) == freed
    for name in frozen.precomputed:
        table = frozen.unet.get_submodule(name)
        assert isinstance(table, KnownInputs)
        expected = 1 if layers[name] == "time" else len(OBJECTS)  # one timestep; a row per prompt
        assert len(table.inputs) == len(table.outputs) == expected
    # only cross-attentions' keys and values (a self-attention's see the image)
    for name in frozen.precomputed:
        if layers[name] == "prompt":
            assert frozen.unet.get_submodule(name.rpartition(".")[0]).is_cross_attention


def test_maps_are_the_same_bit_for_bit_at_batch_one_and_to_rounding_above(pair) -> None:
    plain, frozen = pair
    queries = images(3, seed=6)
    for batch_size in (1, 3):
        expected = plain.predict(queries, batch_size=batch_size)
        got = frozen.predict(queries, batch_size=batch_size)
        for key in ("diff_L", "diff_V"):
            if batch_size == 1:  # each table row is the layer's own batch-1 output
                assert torch.equal(got[key], expected[key]), key
            else:
                torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_another_timestep_or_prompt_is_refused_not_answered(pair) -> None:
    _, frozen = pair
    z0 = frozen.encode_latents(frozen.preprocess(images(1)))
    prompt = frozen.prompt_embeddings("metal nut", "damage")
    other = frozen.config.timestep + 1
    with pytest.raises(ClipfusionError, match="time_embedding.*precompute_conditioning=false"):
        frozen.run_unet(frozen.unet_input(z0, timestep=other), prompt, timestep=other)
    with pytest.raises(ClipfusionError, match="to_k"):
        frozen.run_unet(frozen.unet_input(z0), prompt + 1e-3)
    from clipfusion.config import with_overrides

    with pytest.raises(ConfigError, match="timestep"):
        frozen.check_config(with_overrides(frozen.config, {"timestep": other}))


def test_prompts_whose_keys_and_values_outweigh_the_projections_keep_them() -> None:
    """Keys and values of 77 tokens per prompt outweigh a projection of the text width (32 in the tiny
    preset) from the first prompt on: only the timestep layers are replaced."""
    branch = _branch()
    branch.prepare(["bottle"])
    branch.release_text_encoder()
    layers = conditioning_layers(branch.unet) | {name: "time" for name in branch.precomputed}
    assert branch.precomputed and all(layers[name] == "time" for name in branch.precomputed)


def test_the_weights_fingerprint_is_the_loaded_weights_one(pair) -> None:
    plain, frozen = pair
    assert frozen.weights_fingerprint() == plain.weights_fingerprint()


def test_a_saved_fit_loads_precomputed_with_the_same_maps(tmp_path) -> None:
    from clipfusion import CLIPFusion

    refs, queries = images(1, seed=5), images(2, seed=6)
    det = CLIPFusion.from_preset("tiny", objects=["metal nut"])
    assert det.diffusion.precomputed
    expected = det.fit("metal nut", refs).predict(queries, batch_size=1)
    det.save(tmp_path / "fit")
    loaded = CLIPFusion.load(tmp_path / "fit")
    assert loaded.diffusion.precomputed == det.diffusion.precomputed
    for a, b in zip(expected, loaded.predict(queries, batch_size=1), strict=True):
        assert torch.equal(torch.as_tensor(a.anomaly_map), torch.as_tensor(b.anomaly_map))
