"""Loading OpenCLIP models: by architecture name with a pretrained tag, a local checkpoint, or random weights.

This is the only module of the CLIP side that touches the disk or the network. Three kinds of weight source
are accepted for ``pretrained``:

- ``"random"``: the architecture with weights drawn from ``init_seed`` (no file is read). Used by the
  ``tiny`` and ``random-full`` presets.
- a local checkpoint file or a directory holding one (``open_clip_model.safetensors`` preferred): what an
  offline machine uses. ``.safetensors`` files are read with safetensors; ``.bin``/``.pt``/``.pth`` files
  only with ``torch.load(weights_only=True)``, so that a checkpoint cannot run code when it is opened.
- an open_clip pretrained tag (``laion400m_e31``): resolved through the Hugging Face hub cache, which
  honours ``HF_HUB_OFFLINE``; a copy that open_clip itself downloaded earlier (``~/.cache/clip``) is also
  accepted. Nothing is downloaded from other URLs, so an offline machine fails at once with a message that
  says what was tried, instead of hanging on a socket.

Architectures are open_clip's model configs plus the ones shipped in ``clipfusion/models/configs``
(``clipfusion-tiny``: a ViT with the real model's 240 px input and 16 px patches, so the same 15×15 token
grid, but two narrow layers per tower; seconds on a CPU).
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipfusion.errors import ConfigError, WeightsUnavailableError, first_line
from clipfusion.files import looks_like_path, sha256_file

RANDOM = "random"

#: file names looked for, in this order, when ``pretrained`` is a directory
CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.pth",
    "model.pt",
)
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

_HOW_TO_PROVIDE = (
    "provide a weights folder made by `clipfusion weights fetch --to DIR` on a connected machine "
    "(Python: weights_dir=DIR; command line: --weights-dir DIR or CLIPFUSION_WEIGHTS=DIR), or set "
    "clip.checkpoint to a local checkpoint file or folder (e.g. open_clip_model.safetensors), or run once "
    "with network access so the Hugging Face cache holds them"
)

_registered = False


def shipped_config_dir() -> Path:
    """Folder of the architecture configs that ship with clipfusion (JSON, open_clip's format)."""
    return Path(str(resources.files("clipfusion") / "models" / "configs"))


def register_model_configs() -> None:
    """Make the shipped architectures (``clipfusion-tiny``) known to open_clip by name; idempotent."""
    global _registered
    if _registered:
        return
    import open_clip

    for path in sorted(shipped_config_dir().glob("clip*.json")):
        open_clip.add_model_config(path)
    _registered = True


def load_open_clip(
    model: str,
    pretrained: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    init_seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
) -> tuple[nn.Module, Any]:
    """Build an open_clip model and its tokenizer, in eval mode on ``device`` in ``dtype``.

    ``pretrained`` is an open_clip tag, a local checkpoint file or folder, or ``"random"``. The weights are
    built on the CPU in float32 first, so that a given ``init_seed`` gives the same random model on every
    device, and the global torch RNG is left as it was. A tag's pre-processing (mean, std) is recorded on the
    model as open_clip records it, so the branch normalises pixels as the weights expect. The tokenizer is
    open_clip's bundled BPE tokenizer (no download). ``local_files_only`` keeps the hub out of it (default:
    ``huggingface_hub``'s own offline setting, ``HF_HUB_OFFLINE``).
    """
    import open_clip

    register_model_configs()
    if model.startswith(("hf-hub:", "local-dir:")):
        # open_clip would fetch the config (and weights) from the hub; here weights come from `pretrained`
        raise ConfigError(
            f"clip.model {model!r}: give an architecture name (e.g. ViT-B-16-plus-240) and put the hub "
            "repository's checkpoint file or folder in clip.checkpoint"
        )
    if open_clip.get_model_config(model) is None:
        raise ConfigError(
            f"unknown CLIP architecture {model!r}; known: clipfusion-tiny, ViT-B-16-plus-240 and the other "
            "open_clip model configs (open_clip.list_models())"
        )
    checkpoint = resolve_checkpoint(model, pretrained, cache_dir=cache_dir, local_files_only=local_files_only)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        # open_clip logs a warning for every randomly initialised model; here that is the intent
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            clip = open_clip.create_model(model, pretrained=None, device="cpu", precision="fp32")
        finally:
            logging.disable(previous)
    if checkpoint is not None:
        load_checkpoint_into(clip, checkpoint, model=model)
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained != RANDOM else {}
    if tag_cfg:
        from open_clip.transform import merge_preprocess_dict

        preprocess = merge_preprocess_dict(open_clip.get_model_preprocess_cfg(clip), tag_cfg)
        open_clip.set_model_preprocess_cfg(clip, preprocess)
    clip = clip.to(device=device, dtype=dtype).eval()
    clip.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model)
    return clip, tokenizer


def resolve_checkpoint(
    model: str,
    pretrained: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
) -> Path | None:
    """The checkpoint file that ``pretrained`` names for ``model`` (``None`` for random weights)."""
    if pretrained == RANDOM:
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _checkpoint_in_dir(path)
    if looks_like_path(pretrained, CHECKPOINT_SUFFIXES):
        raise WeightsUnavailableError(
            f"CLIP weights {pretrained!r}: no such file or folder; {_HOW_TO_PROVIDE}"
        )
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        known = open_clip.list_pretrained_tags_by_model(model)
        raise ConfigError(
            f"clip.checkpoint {pretrained!r} is not a pretrained tag of {model!r} (known tags: "
            f"{', '.join(known) if known else 'none'}), nor an existing checkpoint file or folder; "
            "use clip.weights = 'random' for random weights"
        )
    return _checkpoint_for_tag(model, pretrained, tag_cfg, cache_dir, local_files_only)


def load_checkpoint_into(clip: nn.Module, checkpoint: str | os.PathLike[str], *, model: str = "") -> None:
    """Load a checkpoint into ``clip`` strictly: every tensor must be there, with the right shape."""
    state_dict = read_state_dict(checkpoint)
    try:
        clip.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise WeightsUnavailableError(
            f"{checkpoint}: does not hold weights of the CLIP architecture {model or type(clip).__name__} "
            f"({first_line(exc, '')} {detail[:300]})"
        ) from exc


def read_state_dict(checkpoint: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, read without executing anything it contains.

    safetensors files hold nothing but tensors; pickle-based files (``.bin``, ``.pt``, ``.pth``) are opened
    with ``weights_only=True``, which refuses any object that is not a tensor or a plain container. The
    training wrappers open_clip's own checkpoints use (a ``state_dict`` entry, ``module.`` prefixes) are
    unwrapped.
    """
    path = Path(checkpoint)
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise WeightsUnavailableError(
            f"{path}: not a checkpoint clipfusion reads (expected {', '.join(CHECKPOINT_SUFFIXES)})"
        )
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise WeightsUnavailableError(f"{path}: cannot read checkpoint ({exc.strerror or exc})") from exc
    except Exception as exc:  # UnpicklingError, SafetensorError, truncated zip archives, ...
        reason = first_line(exc, type(exc).__name__)
        raise WeightsUnavailableError(
            f"{path}: refused or unreadable checkpoint (only safetensors, or pickles that load with "
            f"torch.load(weights_only=True), are accepted): {reason[:300]}"
        ) from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if (
        not isinstance(loaded, dict)
        or not loaded
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())
    ):
        raise WeightsUnavailableError(f"{path}: does not contain a state dict of tensors")
    if all(key.startswith("module.") for key in loaded):
        loaded = {key[len("module.") :]: value for key, value in loaded.items()}
    return loaded


# ---------------------------------------------------------------------------------------------------------


def _checkpoint_in_dir(folder: Path) -> Path:
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES
    )
    # safetensors first: it cannot carry code
    candidates.sort(key=lambda p: p.suffix.lower() != ".safetensors")
    if len(candidates) == 1 or (candidates and candidates[0].suffix.lower() == ".safetensors"):
        return candidates[0]
    if not candidates:
        raise WeightsUnavailableError(
            f"{folder}: no CLIP checkpoint in this folder (looked for {', '.join(CHECKPOINT_NAMES[:4])} "
            f"or any {', '.join(CHECKPOINT_SUFFIXES)} file); {_HOW_TO_PROVIDE}"
        )
    raise WeightsUnavailableError(
        f"{folder}: several candidate checkpoints ({', '.join(p.name for p in candidates)}); "
        "point clip.checkpoint at the file to use"
    )


def _checkpoint_for_tag(
    model: str,
    tag: str,
    tag_cfg: dict[str, Any],
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool | None,
) -> Path:
    tried: list[str] = []
    offline = _hub_offline() if local_files_only is None else local_files_only
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        found = _from_hf_hub(hub, cache_dir, tried, offline=offline)
        if found is not None:
            return found
    url = tag_cfg.get("url", "")
    if url:
        found = _from_open_clip_cache(url, cache_dir, tried)
        if found is not None:
            return found
    if not tried:
        tried.append("no download source is known for this tag")
    raise WeightsUnavailableError(
        f"CLIP weights for {model} / {tag} are not available"
        f"{' (offline: no download attempted)' if offline else ''}; tried: {'; '.join(tried)}; "
        f"{_HOW_TO_PROVIDE}"
    )


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return False


def _from_hf_hub(
    hub: str, cache_dir: str | os.PathLike[str] | None, tried: list[str], *, offline: bool
) -> Path | None:
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        tried.append("Hugging Face hub (huggingface_hub is not installed)")
        return None
    # open_clip's convention: 'org/repo/' means the default file name, 'org/repo/file' a given one
    repo_id, filename = hub.rstrip("/"), ""
    if not hub.endswith("/"):
        repo_id, filename = os.path.split(hub)
    filenames = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename.endswith((".bin", ".pth")):  # a safetensors twin is preferred, as open_clip does
        filenames.insert(0, filename[:-4] + ".safetensors")
    where = str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    # the cache first, for every candidate: a cached .bin beats a network round trip for the .safetensors
    for name in filenames:
        try:
            return Path(
                hf_hub_download(repo_id=repo_id, filename=name, cache_dir=cache_dir, local_files_only=True)
            )
        except Exception:
            tried.append(f"hf://{repo_id}/{name} (not in the cache {where})")
    if offline:
        return None
    # huggingface_hub retries for about a minute when the host cannot be resolved; ask once, quickly
    if not _reachable(constants.ENDPOINT):
        tried.append(f"{constants.ENDPOINT} (unreachable from this machine)")
        return None
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id=repo_id, filename=name, cache_dir=cache_dir))
        except Exception as exc:  # missing file, network errors
            reason = first_line(exc, "")
            tried.append(f"download hf://{repo_id}/{name}: {type(exc).__name__} {reason[:160]}".rstrip())
    return None


def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether ``endpoint`` answers a TCP connection within ``timeout`` seconds *in all*, the name lookup
    included: a resolver that cannot reach its server blocks ``getaddrinfo`` for half a minute whatever the
    socket's timeout, so the probe runs in a daemon thread that is simply not waited for."""
    import socket
    import threading
    from urllib.parse import urlparse

    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
                answered.append(True)
        except OSError:
            answered.append(False)

    thread = threading.Thread(target=probe, name="clipfusion-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


def _from_open_clip_cache(
    url: str, cache_dir: str | os.PathLike[str] | None, tried: list[str]
) -> Path | None:
    """A file that open_clip downloaded from ``url`` earlier; checked against the hash in its name."""
    folders = [Path(cache_dir)] if cache_dir is not None else []
    folders.append(Path("~/.cache/clip").expanduser())
    filename = url.rsplit("/", 1)[-1]
    for folder in folders:
        candidate = folder / filename
        if not candidate.is_file():
            tried.append(f"{candidate} (missing)")
            continue
        expected = Path(filename).stem.split("-")[-1] if "mlfoundations" in url else ""
        if expected and not sha256_file(candidate).startswith(expected):
            tried.append(f"{candidate} (sha256 does not start with {expected}: corrupt or partial)")
            continue
        return candidate
    return None
