"""Loading OpenCLIP models offline: random weights, safe local checkpoints, clear errors, no download."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipfusion.branches.patchclip import PatchCLIP
from clipfusion.config import load_preset
from clipfusion.errors import ConfigError, WeightsUnavailableError
from clipfusion.models.clip import load_open_clip, read_state_dict


class _Evil:
    """Unpickling this would create a file; a safe loader must refuse before it runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    return PatchCLIP.from_preset("tiny").preprocess(images)


def _outputs(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return model.encode_image(pixels), model.encode_text(torch.arange(1, 78).view(1, 77))


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_tiny_architecture_matches_the_real_token_grid():
    model, tokenizer = load_open_clip("clipfusion-tiny", "random")
    visual = model.visual
    assert tuple(visual.image_size) == (240, 240) and tuple(visual.grid_size) == (15, 15)
    assert model.vocab_size == 49408 and model.context_length == 77
    winclip_uses = ("output_tokens", "patch_dropout", "ln_pre", "transformer", "ln_post", "_global_pool")
    for name in (*winclip_uses, "proj"):
        assert hasattr(visual, name), name
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    import open_clip

    # open_clip's bundled BPE vocabulary, nothing downloaded
    assert torch.equal(tokenizer(["a photo of a bottle."]), open_clip.tokenize(["a photo of a bottle."]))


def test_random_weights_are_seeded_and_leave_the_global_rng_alone(pixels):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = _outputs(load_open_clip("clipfusion-tiny", "random", init_seed=0)[0], pixels)
    assert torch.equal(torch.rand(3), expected_next)
    b = _outputs(load_open_clip("clipfusion-tiny", "random", init_seed=0)[0], pixels)
    c = _outputs(load_open_clip("clipfusion-tiny", "random", init_seed=1)[0], pixels)
    assert _same(a, b) and not _same(a, c)


def test_safetensors_checkpoint_round_trips(tmp_path, pixels):
    from safetensors.torch import save_file

    source, _ = load_open_clip("clipfusion-tiny", "random", init_seed=7)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded, _ = load_open_clip("clipfusion-tiny", str(path), init_seed=0)
    assert _same(_outputs(loaded, pixels), _outputs(source, pixels))
    # a folder holding open_clip's file name, as a weights folder does
    folder = tmp_path / "weights"
    folder.mkdir()
    path.rename(folder / "open_clip_model.safetensors")
    from_folder, _ = load_open_clip("clipfusion-tiny", str(folder))
    assert _same(_outputs(from_folder, pixels), _outputs(source, pixels))
    # and through the preset machinery
    branch = PatchCLIP.from_preset("tiny", weights="pretrained", checkpoint=str(folder))
    assert _same(_outputs(branch.model, pixels), _outputs(source, pixels))


def test_pickle_checkpoints_load_only_with_weights_only(tmp_path, pixels):
    source, _ = load_open_clip("clipfusion-tiny", "random", init_seed=3)
    plain = tmp_path / "tiny.pt"
    # open_clip's training checkpoints wrap the weights: {"state_dict": {"module.<name>": ...}, ...}
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"epoch": 31, "name": "run", "state_dict": wrapped}, plain)
    loaded, _ = load_open_clip("clipfusion-tiny", str(plain))
    assert _same(_outputs(loaded, pixels), _outputs(source, pixels))

    evil, marker = tmp_path / "evil.pt", tmp_path / "the_pickle_ran"
    torch.save({"state_dict": source.state_dict(), "payload": _Evil(marker)}, evil)
    with pytest.raises(WeightsUnavailableError, match="weights_only"):
        load_open_clip("clipfusion-tiny", str(evil))
    assert not marker.exists(), "the pickle's code ran"
    torch.load(evil, weights_only=False)  # the trap works: an unsafe load would have run it
    assert marker.exists()


def test_wrong_or_broken_checkpoints_are_refused(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(other))
    with pytest.raises(WeightsUnavailableError, match="clipfusion-tiny"):
        load_open_clip("clipfusion-tiny", str(other))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(other.read_bytes()[:20])
    with pytest.raises(WeightsUnavailableError, match="truncated.safetensors"):
        load_open_clip("clipfusion-tiny", str(truncated))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailableError, match="no CLIP checkpoint"):
        load_open_clip("clipfusion-tiny", str(tmp_path / "empty"))
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        load_open_clip("clipfusion-tiny", str(tmp_path / "absent.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="not a checkpoint"):
        read_state_dict(other.with_suffix(".ckpt"))


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="unknown CLIP architecture"):
        load_open_clip("ViT-Nope", "random")
    with pytest.raises(ConfigError, match="laion400m_e31"):  # the message lists the known tags
        load_open_clip("ViT-B-16-plus-240", "laion400m_e99")


def test_missing_pretrained_weights_offline_fail_fast_with_a_useful_message(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # conftest sets it too; never reach out
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_open_clip("ViT-B-16-plus-240", "laion400m_e31", cache_dir=tmp_path)
    message = str(info.value)
    assert time.monotonic() - started < 30
    for needed in ("ViT-B-16-plus-240", "laion400m_e31", str(tmp_path), "weights_dir=", "--weights-dir"):
        assert needed in message, needed
    assert "\n" not in message
    # the paper preset names exactly these weights
    assert "offline" in message
    assert (load_preset("paper").clip.model, load_preset("paper").clip.checkpoint) == (
        "ViT-B-16-plus-240",
        "laion400m_e31",
    )
