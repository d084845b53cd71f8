"""`clipfusion weights verify|where` against a weights folder fetched from a local stand-in for the hub."""

import shutil
from pathlib import Path

import pytest

from clipfusion.cli import main
from clipfusion.config import load_preset
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


def test_cli_verify_and_where(tmp_path, hub, capsys):
    dest = tmp_path / "w"
    weights.fetch(dest, _sources(), hub=DirectoryHub(hub), log=lambda _m: None)
    assert main(["weights", "verify", str(dest)]) == 0
    assert "all intact" in capsys.readouterr().out
    (dest / "sd2-inpainting/unet/config.json").write_text("changed!")
    assert main(["weights", "verify", str(dest)]) == 2
    assert "unet/config.json" in capsys.readouterr().err
    assert main(["weights", "where", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "clip: clipfusion-tiny, random weights (seed 0): no file needed" in out


def test_where_says_for_each_required_file_whether_it_is_there(tmp_path, hub, capsys):
    dest = tmp_path / "w"
    weights.fetch(dest, _sources(), hub=DirectoryHub(hub), log=lambda _m: None)
    argv = ["weights", "where", "--weights-dir", str(dest)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in (
        "clip: open_clip_model.safetensors: present",
        "diffusion: unet/diffusion_pytorch_model.safetensors: present",
        "diffusion: tokenizer/merges.txt: present",
        "verified: every file matches the manifest",
    ):
        assert name in out, name
    (dest / "sd2-inpainting/vae/diffusion_pytorch_model.safetensors").unlink()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "diffusion: vae/diffusion_pytorch_model.safetensors: MISSING" in captured.out
    assert "problem(s) with the weights" in captured.err
    # --quiet, for scripts: nothing on stdout, one line per problem, the same exit status
    assert main([*argv, "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "vae/diffusion_pytorch_model.safetensors is missing" in captured.err
    # nothing at all where the default preset looks (the hub cache of this machine is empty)
    assert main(["weights", "where", "-q"]) == 2
    assert "clip: open_clip_model.safetensors is missing" in capsys.readouterr().err


def test_verify_answers_a_manifest_that_is_not_utf8_with_one_line(tmp_path, capsys):
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "manifest.json").write_bytes(b'{"format": 1, "note": "\xe9t\xe9"}')
    assert main(["weights", "verify", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{folder / 'manifest.json'}: not valid JSON (not UTF-8 text" in err
