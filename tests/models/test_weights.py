"""The offline-weights logic against a local stand-in for the hub (the real hub is unreachable here; the
HuggingFaceHub adapter itself is exercised only on a connected machine)."""

import json
import shutil
from pathlib import Path

import pytest

from clipfusion.config import load_preset
from clipfusion.errors import WeightsUnavailableError
from clipfusion.models import weights


class DirectoryHub:
    """Repositories as folders: ``root/<repo_id>/<files>``; can be told to break after n downloads."""

    def __init__(self, root: Path, fail_after: int | None = None) -> None:
        self.root = root
        self.fail_after = fail_after
        self.downloads: list[str] = []

    def resolve(self, repo_id, revision):
        if not (self.root / repo_id).is_dir():
            raise FileNotFoundError(f"404 {repo_id}")
        return "0123abcd" if revision == "main" else revision

    def list_files(self, repo_id, revision):
        base = self.root / repo_id
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())

    def download(self, repo_id, filename, revision, local_dir):
        if self.fail_after is not None and len(self.downloads) >= self.fail_after:
            raise ConnectionError("connection reset")
        self.downloads.append(filename)
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / repo_id / filename, target)
        return target


@pytest.fixture()
def hub(tmp_path):
    root = tmp_path / "hub"
    files = {
        "org/clip-repo/open_clip_config.json": "{}",
        "org/clip-repo/open_clip_model.safetensors": "clip-weights" * 100,
        "org/clip-repo/open_clip_pytorch_model.bin": "not wanted",
        "org/sd/model_index.json": "{}",
        "org/sd/scheduler/scheduler_config.json": "{}",
        "org/sd/tokenizer/vocab.json": "{}",
        "org/sd/tokenizer/merges.txt": "#",
        "org/sd/text_encoder/config.json": "{}",
        "org/sd/text_encoder/model.safetensors": "te" * 50,
        "org/sd/unet/config.json": "{}",
        "org/sd/unet/diffusion_pytorch_model.safetensors": "unet" * 300,
        "org/sd/unet/diffusion_pytorch_model.fp16.safetensors": "half",
        "org/sd/vae/config.json": "{}",
        "org/sd/vae/diffusion_pytorch_model.safetensors": "vae" * 80,
        "org/sd/safety_checker/model.safetensors": "not wanted",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _sources():
    config = load_preset("paper").replace(**{"diffusion.model": "org/sd"})
    return weights.sources_for(config, clip_repo="org/clip-repo")


def test_open_clip_knows_the_paper_checkpoint_repository():
    assert weights.clip_hub_repo("ViT-B-16-plus-240", "laion400m_e31").startswith("timm/")


def test_fetch_writes_only_needed_files_and_a_manifest_that_verifies(tmp_path, hub):
    dest = tmp_path / "w"
    manifest = weights.fetch(dest, _sources(), hub=DirectoryHub(hub), log=lambda _m: None)
    paths = {f["path"] for f in manifest["files"]}
    assert "open_clip/ViT-B-16-plus-240/laion400m_e31/open_clip_model.safetensors" in paths
    assert "sd2-inpainting/unet/diffusion_pytorch_model.safetensors" in paths
    assert not any("safety_checker" in p or p.endswith(".bin") or ".fp16." in p for p in paths)
    assert manifest["complete"] is True
    assert {s["commit"] for s in manifest["sources"]} == {"0123abcd"}
    assert weights.verify(dest) == []


def test_variant_fetches_the_fp16_files(tmp_path, hub):
    config = load_preset("paper").replace(**{"diffusion.model": "org/sd"})
    sources = weights.sources_for(config, clip_repo="org/clip-repo", variant="fp16")
    (hub / "org/sd/text_encoder/model.fp16.safetensors").write_text("t")
    (hub / "org/sd/vae/diffusion_pytorch_model.fp16.safetensors").write_text("v")
    manifest = weights.fetch(tmp_path / "w", sources, hub=DirectoryHub(hub), log=lambda _m: None)
    assert "sd2-inpainting/unet/diffusion_pytorch_model.fp16.safetensors" in {
        f["path"] for f in manifest["files"]
    }


def test_verify_reports_corruption_truncation_and_missing_files(tmp_path, hub):
    dest = tmp_path / "w"
    weights.fetch(dest, _sources(), hub=DirectoryHub(hub), log=lambda _m: None)
    unet = dest / "sd2-inpainting/unet/diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[10] ^= 0xFF
    unet.write_bytes(bytes(data))
    vae = dest / "sd2-inpainting/vae/diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:5])
    (dest / "sd2-inpainting/tokenizer/merges.txt").unlink()
    problems = weights.verify(dest)
    assert any("unet" in p and "corrupted" in p for p in problems)
    assert any("vae" in p and "truncated" in p for p in problems)
    assert any("merges.txt: missing" in p for p in problems)
    assert weights.verify(tmp_path / "nothing")[0].endswith("not a folder")
    (tmp_path / "empty").mkdir()
    assert "no manifest.json" in weights.verify(tmp_path / "empty")[0]


def test_interrupted_fetch_is_reported_and_resumed_without_refetching(tmp_path, hub):
    dest = tmp_path / "w"
    with pytest.raises(ConnectionError):
        weights.fetch(dest, _sources(), hub=DirectoryHub(hub, fail_after=3), log=lambda _m: None)
    assert any("did not finish" in p for p in weights.verify(dest))
    second = DirectoryHub(hub)
    weights.fetch(dest, _sources(), hub=second, log=lambda _m: None)
    assert len(second.downloads) == len(json.loads((dest / "manifest.json").read_text())["files"]) - 3
    assert weights.verify(dest) == []


def test_unknown_repository_is_a_clear_error(tmp_path, hub):
    config = load_preset("paper").replace(**{"diffusion.model": "org/missing"})
    sources = weights.sources_for(config, clip_repo="org/clip-repo")
    with pytest.raises(WeightsUnavailableError, match="org/missing@main: cannot list"):
        weights.fetch(tmp_path / "w", sources, hub=DirectoryHub(hub), log=lambda _m: None)


def test_weights_dir_points_the_config_at_local_paths(tmp_path, hub, monkeypatch):
    dest = tmp_path / "w"
    weights.fetch(dest, _sources(), hub=DirectoryHub(hub), log=lambda _m: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    local = weights.apply_weights_dir(load_preset("paper"), dest)
    assert Path(local.clip.checkpoint) == dest / "open_clip/ViT-B-16-plus-240/laion400m_e31"
    assert Path(local.diffusion.model) == dest / "sd2-inpainting"
    import os

    # the library never changes the process's hub settings: local paths need no hub at all
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    # random presets are untouched; a folder without the files is a clear error
    assert weights.apply_weights_dir(load_preset("tiny"), dest) == load_preset("tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailableError, match="has no OpenCLIP weights"):
        weights.apply_weights_dir(load_preset("paper"), tmp_path / "empty")


def test_missing_weights_fail_at_once_before_anything_loads(tmp_path, hub, monkeypatch):
    """Nothing in the cache and downloads off: one line naming what is missing, without a load or a probe."""
    from huggingface_hub import constants

    monkeypatch.setattr(weights, "_cached", lambda *a, **k: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match="downloads are off") as info:
        weights.check_available(load_preset("paper"))
    assert "open_clip_model.safetensors" in str(info.value) and "\n" not in str(info.value)
    weights.check_available(load_preset("tiny"))  # random weights need no file
    # a weights folder with every file: nothing to say
    folder = tmp_path / "w"
    weights.fetch(folder, _sources(), hub=DirectoryHub(hub), log=lambda _m: None)
    weights.check_available(load_preset("paper"), folder)


def test_a_hub_whose_name_lookup_hangs_is_given_up_in_seconds(monkeypatch):
    """A resolver that cannot reach its server blocks for half a minute whatever the socket's timeout: the
    probe bounds the whole lookup and connection, so the command fails at once instead of after it."""
    import socket
    import threading
    import time

    from huggingface_hub import constants

    release = threading.Event()

    def hanging_lookup(*args, **kwargs):
        release.wait(30)
        raise socket.gaierror("Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    monkeypatch.setattr(weights, "_cached", lambda *a, **k: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    try:
        with pytest.raises(WeightsUnavailableError, match="cannot be reached from here"):
            weights.check_available(load_preset("paper"))
    finally:
        release.set()
    assert time.monotonic() - start < 10
