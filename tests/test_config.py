import json
import re

import pytest

from clipfusion.config import (
    PRESETS,
    CLIPFusionConfig,
    load_config,
    load_preset,
    preset_path,
    save_config,
    with_overrides,
)
from clipfusion.errors import ConfigError


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_names_itself(name):
    config = load_preset(name)
    assert config.preset == name
    assert 0.0 <= config.alpha_map <= 1.0


def test_paper_preset_has_the_paper_values():
    config = load_preset("paper")
    assert config.alpha_map == 0.25
    assert config.alpha_score == 0.75
    assert config.clip.model == "ViT-B-16-plus-240"
    assert (config.clip.weights, config.clip.checkpoint) == ("pretrained", "laion400m_e31")
    assert config.clip.temperature == 0.07
    assert config.diffusion.model == "stabilityai/stable-diffusion-2-inpainting"
    assert config.diffusion.timestep == 100
    assert config.diffusion.state_words == ("damage",)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown preset 'fast'.*paper"):
        load_preset("fast")


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_round_trip_through_files(tmp_path, suffix):
    config = load_preset("tiny").replace(**{"alpha_map": 0.4, "clip.patch_mode": "crops"})
    path = save_config(config, tmp_path / f"cfg{suffix}")
    assert load_config(path) == config


def test_overrides_validate_names_and_types():
    config = load_preset("paper")
    assert with_overrides(config, {"diffusion.state_words": ["damage", "flaw"]}).diffusion.state_words == (
        "damage",
        "flaw",
    )
    with pytest.raises(ConfigError, match="unknown option 'clip.nope'"):
        with_overrides(config, {"clip.nope": 1})
    with pytest.raises(ConfigError, match="alpha_map: expected a number"):
        with_overrides(config, {"alpha_map": "high"})
    with pytest.raises(ConfigError, match="expected an integer"):
        with_overrides(config, {"diffusion.timestep": 1.5})


def test_bad_config_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        load_config(bad)
    unknown = tmp_path / "extra.json"
    unknown.write_text(json.dumps({"alpha": 1}))
    with pytest.raises(ConfigError, match="extra.json: unknown option"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="must end in .json or .toml"):
        save_config(CLIPFusionConfig(), tmp_path / "cfg.yaml")


def test_auto_is_the_default_dtype_except_for_the_tiny_test_preset():
    assert CLIPFusionConfig().dtype == "auto"
    assert load_preset("paper").dtype == load_preset("random-full").dtype == "auto"
    assert load_preset("tiny").dtype == "float32"  # the same numbers on every machine for tests and demo


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_the_resolved_record_is_saved_and_ignored_when_read_back(tmp_path, suffix):
    config = load_preset("random-full")
    record = {"clip": {"device": "cpu", "dtype": "float32"}, "auto_dtype": "CPU without AMX (AVX2): float32"}
    path = save_config(config, tmp_path / f"run{suffix}", resolved=record)
    assert "resolved" in path.read_text() and "CPU without AMX" in path.read_text()
    assert load_config(path) == config


def test_placement_is_declared_once_and_inherited_unless_a_branch_overrides_it(tmp_path):
    config = load_preset("tiny").replace(**{"dtype": "bfloat16", "clip.dtype": "float32"})
    clip, diffusion = config.branch_configs()
    assert (clip.dtype, diffusion.dtype) == ("float32", "bfloat16")
    assert clip.output_size == diffusion.output_size == config.output_size == 64
    assert clip.device == diffusion.device == "auto"
    data = config.to_dict()
    assert "dtype" not in data["diffusion"] and data["clip"]["dtype"] == "float32"  # unset: not written
    for suffix in (".json", ".toml"):
        assert load_config(save_config(config, tmp_path / f"c{suffix}")) == config
    # back to inheriting: null in JSON (`--set clip.dtype=null`)
    assert with_overrides(config, {"clip.dtype": None}).branch_configs()[0].dtype == "bfloat16"
    # a preset file states the placement once
    for name in PRESETS:
        text = preset_path(name).read_text()
        for option in ("dtype", "device", "output_size"):
            assert len(re.findall(rf"^{option}\s*=", text, flags=re.MULTILINE)) == 1, (name, option)


def test_random_weights_are_flagged_for_the_branches_in_use():
    assert load_preset("tiny").random_weights and load_preset("random-full").random_weights
    assert not load_preset("paper").random_weights
    mixed = load_preset("paper").replace(**{"diffusion.weights": "random"})
    assert mixed.random_weights and not mixed.replace(use_diffusion=False).random_weights
