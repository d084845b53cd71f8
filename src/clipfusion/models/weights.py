"""Weights for offline machines: one self-contained folder with everything the ``paper`` preset needs.

Layout of a weights folder (made by ``clipfusion weights fetch --to DIR`` on a connected machine)::

    DIR/manifest.json                 files, sizes, sha256, source repositories and resolved revisions
    DIR/open_clip/<arch>/<tag>/       the OpenCLIP checkpoint (safetensors) and its open_clip_config.json
    DIR/sd2-inpainting/               the diffusers-format SD-2-inpainting components (no safety checker)

Given such a folder (``weights_dir=DIR`` in Python; ``--weights-dir DIR`` or ``CLIPFUSION_WEIGHTS=DIR`` on the
command line), :func:`apply_weights_dir` points the configuration at these local paths, so the loaders read
files and never look anything up on the network. Nothing here reads or writes environment variables: a
program that imports clipfusion keeps its own hub settings.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from clipfusion.config import CLIPFusionConfig
from clipfusion.errors import ClipfusionError, InputError, WeightsUnavailableError, first_line
from clipfusion.files import atomic_write_text, looks_like_path, read_json, sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
SD_SUBDIR = "sd2-inpainting"


def sd_patterns(variant: str | None = None) -> tuple[str, ...]:
    """The files of the diffusers repository the MapDiff loader reads (its own lists), with ``variant``
    weights (``unet/diffusion_pytorch_model.fp16.safetensors``) in place of the float32 ones."""
    from clipfusion.models.diffusion import CONFIG_FILES, WEIGHT_FILES

    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    weights = tuple(name.removesuffix(".safetensors") + suffix for name in WEIGHT_FILES)
    # tokenizer files are optional one by one (tokenizer.json is absent from older repositories)
    return (*CONFIG_FILES, *weights, "tokenizer/*")


CLIP_PATTERNS = ("open_clip_config.json", "open_clip_model.safetensors")


class Hub(Protocol):
    """Where files come from: the Hugging Face hub, a mirror, or a stand-in in tests."""

    def resolve(self, repo_id: str, revision: str) -> str: ...

    def list_files(self, repo_id: str, revision: str) -> list[str]: ...

    def download(self, repo_id: str, filename: str, revision: str, local_dir: Path) -> Path: ...


class HuggingFaceHub:
    """The real hub (or the mirror named by ``HF_ENDPOINT``); downloads resume where they stopped."""

    def resolve(self, repo_id: str, revision: str) -> str:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, revision=revision).sha or revision

    def list_files(self, repo_id: str, revision: str) -> list[str]:
        from huggingface_hub import list_repo_files

        return list_repo_files(repo_id, revision=revision)

    def download(self, repo_id: str, filename: str, revision: str, local_dir: Path) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename, revision=revision, local_dir=local_dir))


@dataclass(frozen=True)
class Source:
    """One repository to fetch: which files, and where they go inside the weights folder."""

    component: str
    repo_id: str
    revision: str
    patterns: tuple[str, ...]
    subdir: str


def clip_subdir(model: str, tag: str) -> str:
    return f"open_clip/{model}/{tag}"


def clip_hub_repo(model: str, tag: str) -> str:
    """The hub repository open_clip itself uses for (architecture, tag)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    hub = (cfg.get("hf_hub") or "").strip("/")
    if not hub:
        raise WeightsUnavailableError(
            f"open_clip knows no hub repository for {model}/{tag}; give --clip-repo explicitly"
        )
    return hub


def sources_for(
    config: CLIPFusionConfig,
    *,
    clip_repo: str | None = None,
    clip_revision: str = "main",
    variant: str | None = None,
) -> list[Source]:
    """The repositories the configuration needs; ids and revisions overridable for mirrors."""
    clip = config.clip
    return [
        Source(
            "clip",
            clip_repo or clip_hub_repo(clip.model, clip.checkpoint),
            clip_revision,
            CLIP_PATTERNS,
            clip_subdir(clip.model, clip.checkpoint),
        ),
        Source(
            "diffusion",
            config.diffusion.model,
            config.diffusion.revision,
            sd_patterns(variant),
            SD_SUBDIR,
        ),
    ]


def _matching(files: Iterable[str], patterns: Iterable[str]) -> list[str]:
    patterns = list(patterns)
    return sorted(f for f in files if any(fnmatch.fnmatchcase(f, p) for p in patterns))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    data = read_json(path, "weights manifest")
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{path}: not a clipfusion weights manifest (format {MANIFEST_FORMAT})")
    return data


def fetch(
    dest: str | Path,
    sources: list[Source],
    *,
    hub: Hub | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Download every file of ``sources`` into ``dest`` and write the manifest.

    The manifest is rewritten after each file with ``"complete": false`` until the last one, so an
    interrupted fetch is recognisable, and a second fetch skips files whose size and sha256 already match.
    """
    hub = hub or HuggingFaceHub()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(dest) or {}
    known = {f["path"]: f for f in previous.get("files", [])}
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": False,
        "sources": [],
        "files": [],
    }
    for source in sources:
        try:
            commit = hub.resolve(source.repo_id, source.revision)
            names = _matching(hub.list_files(source.repo_id, commit), source.patterns)
        except Exception as exc:  # network and hub errors come in many types
            raise WeightsUnavailableError(
                f"{source.repo_id}@{source.revision}: cannot list the repository ({type(exc).__name__}: "
                f"{first_line(exc)})"
            ) from exc
        missing = [p for p in source.patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if missing:
            raise WeightsUnavailableError(
                f"{source.repo_id}@{commit}: no file matches {', '.join(missing)} "
                "(wrong repository or variant?)"
            )
        manifest["sources"].append(
            {
                "component": source.component,
                "repo_id": source.repo_id,
                "revision": source.revision,
                "commit": commit,
                "subdir": source.subdir,
            }
        )
        for name in names:
            rel = f"{source.subdir}/{name}"
            target = dest / rel
            entry = known.get(rel)
            intact = entry and target.exists() and target.stat().st_size == entry["size"]
            if intact and sha256_file(target) == entry["sha256"]:
                log(f"  have {rel}")
                manifest["files"].append(entry)
                continue
            log(f"  fetch {source.repo_id}/{name}")
            path = hub.download(source.repo_id, name, commit, dest / source.subdir)
            manifest["files"].append(
                {
                    "path": rel,
                    "size": path.stat().st_size,
                    "sha256": sha256_file(path),
                    "repo_id": source.repo_id,
                }
            )
            atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    manifest["complete"] = True
    atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


#: values read from every tensor by :func:`weights_fingerprint`
FINGERPRINT_SAMPLES = 64


def fingerprint_records(part: str, value: Any) -> tuple[bytes, ...]:
    """What :func:`weights_fingerprint` reads of one part (a module's ``state_dict`` or a tensor): a few
    bytes per tensor, which can be kept in place of weights that are about to be freed."""
    import numpy as np
    import torch

    records: list[bytes] = []
    tensors = value.state_dict() if isinstance(value, torch.nn.Module) else {"": value}
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        records.append(f"{part}.{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        n = tensor.numel()
        if n == 0:
            continue
        k = min(n, FINGERPRINT_SAMPLES)
        index = [i * (n - 1) // max(k - 1, 1) for i in range(k)]
        flat = tensor.reshape(-1)
        sample = flat[torch.tensor(index, device=flat.device)]
        records.append(np.ascontiguousarray(sample.float().cpu().numpy()).tobytes())
    return tuple(records)


def weights_fingerprint(parts: dict[str, Any]) -> str:
    """A cheap identity of loaded weights: sha256 over every tensor's name, shape and dtype and a fixed
    sample of its values (``FINGERPRINT_SAMPLES`` evenly spaced elements, read in logical order as float32).

    ``parts`` maps names to modules (their ``state_dict``: parameters and buffers), tensors, or the
    :func:`fingerprint_records` taken of a part before some of its weights were freed. Reading a few
    values per tensor costs milliseconds even for SD-2's 1,000 tensors, where hashing every byte would take
    seconds; any re-draw, re-training or wrong file changes the sampled values. The same weights give the
    same fingerprint on any device and in any memory layout (but not in another dtype).
    """
    digest = hashlib.sha256()
    for part in sorted(parts):
        value = parts[part]
        for record in value if isinstance(value, tuple) else fingerprint_records(part, value):
            digest.update(record)
    return digest.hexdigest()[:32]


def manifest_files(folder: str | Path, subdir: str = "") -> dict[str, str]:
    """``{path: sha256}`` of the manifest entries under ``subdir`` (default: all) of a weights folder (empty
    without a manifest): what a fitted detector records of the weights it was fitted with."""
    manifest = read_manifest(Path(folder)) or {}
    prefix = subdir.rstrip("/") + "/" if subdir else ""
    return {
        entry["path"]: entry["sha256"]
        for entry in manifest.get("files", [])
        if str(entry.get("path", "")).startswith(prefix)
    }


def verify(folder: str | Path) -> list[str]:
    """Problems with a weights folder, one line each (empty when every file is there and intact)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder}: no {MANIFEST}; make the folder with `clipfusion weights fetch --to {folder}`"]
    problems = []
    if not manifest.get("complete"):
        problems.append(f"{folder}: the fetch that made this folder did not finish; run it again to resume")
    for entry in manifest.get("files", []):
        path = folder / entry["path"]
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path}: size {path.stat().st_size}, expected {entry['size']} (truncated?)")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupted)")
    return problems


def apply_weights_dir(config: CLIPFusionConfig, folder: str | Path | None) -> CLIPFusionConfig:
    """Point the pretrained parts of ``config`` at a weights folder's local copies (``folder`` None: the
    configuration as it is). Random-weight branches, and checkpoints already given as local paths, are left
    as they are."""
    if folder is None:
        return config
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise WeightsUnavailableError(f"{folder}: the weights folder does not exist")
    clip, diffusion = config.clip, config.diffusion
    if clip.weights != "random" and not Path(clip.checkpoint).exists():
        local = folder / clip_subdir(clip.model, clip.checkpoint)
        if not local.is_dir():
            raise WeightsUnavailableError(
                f"{folder}: has no OpenCLIP weights for {clip.model}/{clip.checkpoint} (expected {local})"
            )
        clip = replace(clip, checkpoint=str(local))
    if diffusion.weights != "random" and not Path(diffusion.model).exists():
        local = folder / SD_SUBDIR
        if not (local / "model_index.json").exists() and not (local / "unet").is_dir():
            raise WeightsUnavailableError(
                f"{folder}: has no diffusers SD-2-inpainting folder (expected {local})"
            )
        diffusion = replace(diffusion, model=str(local))
    return replace(config, clip=clip, diffusion=diffusion)


@dataclass(frozen=True)
class RequiredFile:
    """One file a configuration needs, and where it was found (``path`` None: missing; ``from_hub``: it
    would come from the Hugging Face cache, so a connected machine could download it)."""

    component: str
    name: str
    path: Path | None
    looked_in: str
    from_hub: bool = False


def required_files(config: CLIPFusionConfig, folder: str | Path | None = None) -> list[RequiredFile]:
    """Every file the pretrained branches of ``config`` read, each looked up where loading would look: the
    weights folder, a local checkpoint or diffusers folder, or the Hugging Face cache (never the network).
    Random-weight branches need none."""
    from clipfusion.models.clip import CHECKPOINT_SUFFIXES
    from clipfusion.models.diffusion import needed_files, weights_variant

    if folder is not None:
        config = apply_weights_dir(config, folder)
    found: list[RequiredFile] = []
    clip, diffusion = config.clip, config.diffusion
    if config.use_clip and clip.weights != "random":
        local = Path(clip.checkpoint).expanduser()
        if local.is_file():
            found.append(RequiredFile("clip", local.name, local, str(local.parent)))
        elif local.is_dir() or looks_like_path(clip.checkpoint, CHECKPOINT_SUFFIXES):
            hit = next((local / n for n in CLIP_PATTERNS[1:] if (local / n).is_file()), None)
            found.append(RequiredFile("clip", CLIP_PATTERNS[1], hit, str(local)))
        else:
            repo = clip_hub_repo(clip.model, clip.checkpoint)
            names = (CLIP_PATTERNS[1], "open_clip_pytorch_model.bin")
            hit = next((p for n in names if (p := _cached(repo, n, "main")) is not None), None)
            found.append(RequiredFile("clip", names[0], hit, f"the Hugging Face cache ({repo})", True))
    if config.use_diffusion and diffusion.weights != "random":
        local = Path(diffusion.model).expanduser()
        if local.is_dir() or _looks_local(diffusion.model):
            json_tokenizer = (local / "tokenizer" / "tokenizer.json").is_file()
            for name in needed_files(
                weights_variant(local) if local.is_dir() else None, tokenizer_json=json_tokenizer
            ):
                path = local / name
                found.append(RequiredFile("diffusion", name, path if path.is_file() else None, str(local)))
        else:
            where = f"the Hugging Face cache ({diffusion.model}@{diffusion.revision})"
            for name in needed_files():
                hit = _cached(diffusion.model, name, diffusion.revision)
                found.append(RequiredFile("diffusion", name, hit, where, True))
    return found


def check_available(config: CLIPFusionConfig, folder: str | Path | None = None) -> None:
    """Fail at once, before anything is loaded, when the pretrained weights ``config`` needs are not on this
    machine and cannot be downloaded: a file missing from a local folder, or missing from the Hugging Face
    cache while the hub is switched off (``HF_HUB_OFFLINE``) or does not answer within seconds (the hub
    client itself would retry for half a minute or more before saying so). Random weights need nothing."""
    from huggingface_hub import constants

    from clipfusion.models.clip import _reachable

    missing = [r for r in required_files(config, folder) if r.path is None]
    if not missing:
        return
    per_place: dict[str, list[str]] = {}
    for item in missing:
        per_place.setdefault(f"{item.component} from {item.looked_in}", []).append(item.name)
    shown = "; ".join(
        f"{where}: {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        for where, names in per_place.items()
    )
    what = f"the {config.preset} preset's pretrained weights are not on this machine (missing {shown})"
    if not all(item.from_hub for item in missing):
        raise WeightsUnavailableError(what)
    from clipfusion.models.diffusion import _offline_default

    if _offline_default():
        raise WeightsUnavailableError(f"{what}, and downloads are off (HF_HUB_OFFLINE)")
    if not _reachable(constants.ENDPOINT):
        raise WeightsUnavailableError(f"{what}, and {constants.ENDPOINT} cannot be reached from here")


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.count("/") != 1


def _cached(repo_id: str, filename: str, revision: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:  # a malformed id or cache: not there
        return None
    return Path(hit) if isinstance(hit, str) else None


def describe(
    config: CLIPFusionConfig, folder: str | Path | None = None, origin: str = "weights_dir"
) -> tuple[list[str], list[str]]:
    """For ``clipfusion weights where``: lines saying what would be used, from where, and whether each
    required file is present; and one line per problem (a missing file, a damaged weights folder)."""
    lines: list[str] = []
    problems: list[str] = []
    if folder is not None:
        folder = Path(folder)
        lines.append(f"weights folder: {folder} (from {origin})")
        folder_problems = verify(folder)
        problems += folder_problems
        if not folder_problems:
            lines.append("  verified: every file matches the manifest")
    clip, diffusion = config.clip, config.diffusion
    if config.use_clip and clip.weights == "random":
        lines.append(f"clip: {clip.model}, random weights (seed {clip.init_seed}): no file needed")
    if config.use_diffusion and diffusion.weights == "random":
        seed = diffusion.init_seed
        lines.append(f"diffusion: {diffusion.architecture}, random weights (seed {seed}): no file needed")
    try:
        required = required_files(config, folder)
    except ClipfusionError as exc:
        return lines, [*problems, str(exc)]
    for item in required:
        state = f"present  {item.path}" if item.path is not None else f"MISSING  (looked in {item.looked_in})"
        lines.append(f"{item.component}: {item.name}: {state}")
        if item.path is None:
            problems.append(f"{item.component}: {item.name} is missing (looked in {item.looked_in})")
    from huggingface_hub import constants

    hub = "offline (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else constants.ENDPOINT
    lines.append(f"hub: {hub}")
    return lines, problems
