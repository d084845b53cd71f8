"""Stable Diffusion 2 inpainting components: pretrained (hub id or local directory) or seeded random.

Everything MapDiff needs comes from here as plain modules (VAE, UNet with 9 input channels, text encoder,
tokenizer, scheduler), so the branch itself never touches the network or the disk. Two sources:

* **pretrained**: a Hugging Face model id (default ``stabilityai/stable-diffusion-2-inpainting``, with a
  revision) or a local diffusers-format directory. Only the files the branch uses are fetched (the repository
  also holds multi-gigabyte checkpoints that are not needed), only safetensors weights are read, and no
  remote code ever runs. Offline and not cached is one :class:`WeightsUnavailableError` saying what was tried.
* **random**: the architectures from JSON configs shipped with the package (``models/configs/sd2-inpainting``
  holds the real model's configs, ``models/configs/sd-tiny`` a miniature with the same block structure), with
  seeded initialisation. No download: ``random-full`` has the real compute for benchmarks, ``tiny`` runs the
  tests in seconds.

The tokenizer of the random builds is made from the BPE vocabulary open_clip ships (the same vocabulary the
real SD-2 tokenizer uses), so prompts tokenize to the same ids with or without the weights.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from clipfusion.config import DEFAULT_DIFFUSION_MODEL as DEFAULT_MODEL
from clipfusion.config import DIFFUSION_ARCHITECTURES, MapDiffConfig
from clipfusion.errors import ConfigError, WeightsUnavailableError, first_line

#: where each architecture's JSON configs ship, under ``clipfusion/models/configs``
_CONFIG_DIRS = {"sd2-inpainting": "sd2-inpainting", "tiny": "sd-tiny"}
assert set(_CONFIG_DIRS) == set(DIFFUSION_ARCHITECTURES)

# The files of a diffusers-format SD-2 inpainting directory that the branch reads. Listing them (rather than
# fetching the whole repository) avoids the multi-gigabyte .ckpt and fp16 variants the hub repository holds.
WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)
CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
TOKENIZER_FILES = (
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer.json",
)
# the scheduler is used only for ``add_noise``, which depends on these keys alone (identical for the DDPM,
# DDIM and PNDM classes a diffusers repository may name)
_SCHEDULER_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "clip_sample",
    "rescale_betas_zero_snr",
)
CLIP_CONTEXT_LENGTH = 77


@dataclass
class SD2Components:
    """The five parts of the inpainting model, as loaded; ``source`` says where they came from."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str = ""

    def modules(self) -> dict[str, Any]:
        """Keyword arguments for :class:`clipfusion.branches.mapdiff.MapDiff`."""
        return {
            "vae": self.vae,
            "unet": self.unet,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "scheduler": self.scheduler,
        }


# ---------------------------------------------------------------------------------------------------------
# shipped configurations and the offline tokenizer


def shipped_config_dir(architecture: str) -> Path:
    """Directory of the JSON configs of ``architecture`` (diffusers layout: ``unet/config.json`` ...)."""
    if architecture not in _CONFIG_DIRS:
        raise ConfigError(
            f"unknown diffusion architecture {architecture!r}; choose one of "
            + ", ".join(DIFFUSION_ARCHITECTURES)
        )
    return Path(str(resources.files("clipfusion") / "models" / "configs" / _CONFIG_DIRS[architecture]))


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable character table (the same as open_clip's and GPT-2's)
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, [chr(c) for c in codes], strict=True))


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Vocabulary and merges of CLIP's BPE, read from the file open_clip ships (no network)."""
    # located without importing open_clip (its import pulls in timm and takes seconds)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(
            "open_clip is not installed: its BPE vocabulary builds the offline tokenizer"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    # the same slice open_clip's SimpleTokenizer takes: 49152 - 256 - 2 merges after the header line
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges  # type: ignore[return-value]


def offline_clip_tokenizer(max_length: int = CLIP_CONTEXT_LENGTH) -> Any:
    """A transformers ``CLIPTokenizer`` configured as SD-2's (start 49406, end 49407, padding ``!`` = 0).

    Built in memory from open_clip's bundled BPE vocabulary, so random presets need no tokenizer download and
    produce the ids the real SD-2 tokenizer produces.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="!",
        model_max_length=max_length,
    )


def _scheduler_from_config(config: dict[str, Any]) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config({k: v for k, v in config.items() if k in _SCHEDULER_KEYS})


# ---------------------------------------------------------------------------------------------------------
# random builds


def build_random_components(
    architecture: str = "tiny",
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder: bool = True,
    image_models: bool = True,
    vae_decoder: bool = True,
    unet_ready: Callable[[Any], None] | None = None,
) -> SD2Components:
    """The architecture from the shipped configs with seeded random weights (no download).

    The global RNG is forked so building a model never changes the caller's random stream; weights depend only
    on ``seed`` (initialised in float32 on the CPU, then moved), so every machine builds the same model. The
    image models (UNet, then VAE) draw from the stream of ``seed``, the text encoder from its own (``seed`` +
    1), so either part can be built alone with the weights it has in the whole: ``text_encoder=False``
    leaves the text encoder out (``None``), ``image_models=False`` the VAE and the UNet (a text encoder
    loaded, used and freed before the image models exist:
    :meth:`clipfusion.branches.mapdiff.MapDiff.from_config` with ``objects``). ``vae_decoder`` and
    ``unet_ready``: see :func:`load_diffusion_components`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = shipped_config_dir(architecture)
    target = torch.device(device)

    # each component is moved to its device and dtype as soon as it is built: a bfloat16 build then holds
    # at most one float32 component at a time, not all three (≈ 5.2 GB for random-full)
    unet = vae = encoder = None
    if image_models:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet_config = UNet2DConditionModel.load_config(root / "unet")
            unet = _placed(UNet2DConditionModel.from_config(unet_config), target, dtype)
            if unet_ready is not None:
                unet_ready(unet)  # draws nothing: the VAE's weights stay those of the stream
            vae = _placed(AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae")), target, dtype)
            if not vae_decoder:
                _drop_decoder(vae)
    if text_encoder:
        text_config = CLIPTextConfig.from_json_file(root / "text_encoder" / "config.json")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            encoder = _placed(CLIPTextModel(text_config), target, dtype)
    scheduler = _scheduler_from_config(json.loads((root / "scheduler" / "scheduler_config.json").read_text()))
    return SD2Components(
        vae,
        unet,
        encoder,
        offline_clip_tokenizer(),
        scheduler,
        source=f"random {architecture} (seed {seed})",
    )


def _drop_decoder(vae: Any) -> None:
    """Free the VAE's decoder half (a third of its weights), which an encoder-only user never runs."""
    from clipfusion.runtime import return_freed_memory

    vae.decoder = None
    vae.post_quant_conv = None
    return_freed_memory()


def _placed(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    # torch's own ``to``: diffusers' override warns about fp32-only modules, which SD-2 does not have
    torch.nn.Module.to(module, device=device, dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    return module


def _place(components: SD2Components, device: torch.device, dtype: torch.dtype) -> SD2Components:
    for module in (components.vae, components.unet, components.text_encoder):
        if module is not None:
            _placed(module, device, dtype)
    return components


# ---------------------------------------------------------------------------------------------------------
# pretrained weights


def _offline_default() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; a weights folder switches it on later (--weights)
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in (
        "1",
        "true",
        "yes",
    )


def weights_variant(directory: Path) -> str | None:
    """``None`` for the plain safetensors files, else the variant (``fp16``) every component has."""
    if all((directory / name).is_file() for name in WEIGHT_FILES):
        return None
    for variant in ("fp16", "bf16"):
        if all(
            (directory / name.replace(".safetensors", f".{variant}.safetensors")).is_file()
            for name in WEIGHT_FILES
        ):
            return variant
    return None


def needed_files(variant: str | None = None, *, tokenizer_json: bool = False) -> tuple[str, ...]:
    """The files of a diffusers-format folder the branch reads: the weights (of ``variant``, e.g. fp16),
    the component configs, and the tokenizer (``tokenizer.json``, or the vocabulary and merges)."""
    weights = tuple(
        n.replace(".safetensors", f".{variant}.safetensors") if variant else n for n in WEIGHT_FILES
    )
    tokenizer = (
        ("tokenizer/tokenizer.json",) if tokenizer_json else ("tokenizer/vocab.json", "tokenizer/merges.txt")
    )
    return (*weights, *CONFIG_FILES[1:], *tokenizer)


def _missing_files(directory: Path) -> list[str]:
    has_json = (directory / "tokenizer" / "tokenizer.json").is_file()
    needed = needed_files(weights_variant(directory), tokenizer_json=has_json)
    return [name for name in needed if not (directory / name).is_file()]


def _how_to_provide(model: str) -> str:
    return (
        f"to use {model} offline, run `clipfusion weights fetch --to DIR` on a connected machine and use "
        "that folder (Python: weights_dir=DIR; command line: --weights-dir DIR or CLIPFUSION_WEIGHTS=DIR), "
        "or set diffusion.model to any diffusers-format folder of the model; the `tiny` and `random-full` "
        "presets need no weights"
    )


def _failure(exc: BaseException, limit: int = 100) -> str:
    """``Type: first line`` of a loader's exception, cut at ``limit`` characters."""
    text = first_line(exc)
    return f"{type(exc).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"


def resolve_weights_dir(
    model: str | Path = DEFAULT_MODEL,
    *,
    revision: str = "main",
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """A local diffusers-format directory holding everything the branch reads.

    ``model`` is a directory (used as is) or a hub id: its needed files only are looked up in the Hugging Face
    cache and, unless offline (``local_files_only``, default: ``HF_HUB_OFFLINE``), downloaded.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        directory = path
        tried = f"the local directory {directory}"
    else:
        text = str(model)
        if text.startswith(("/", "./", "../", "~")) or text.count("/") != 1:
            raise WeightsUnavailableError(
                f"diffusion weights {text!r}: no such directory, and not a Hugging Face model id "
                "(owner/name); " + _how_to_provide(DEFAULT_MODEL)
            )
        offline = _offline_default() if local_files_only is None else local_files_only
        from huggingface_hub import constants, snapshot_download

        from clipfusion.models.clip import _reachable

        # the hub client retries for about a minute when the host cannot be reached: ask once, quickly
        if not offline and not _reachable(constants.ENDPOINT):
            offline = True

        try:
            directory = Path(
                snapshot_download(
                    text,
                    revision=revision,
                    cache_dir=cache_dir,
                    local_files_only=offline,
                    allow_patterns=[*WEIGHT_FILES, *CONFIG_FILES, *TOKENIZER_FILES],
                )
            )
        except Exception as exc:  # the hub client raises many types (HTTP, offline, cache misses, bad ids)
            where = "the Hugging Face cache" + (
                " (offline or hub unreachable: no download attempted)" if offline else " and the hub"
            )
            raise WeightsUnavailableError(
                f"diffusion weights {text!r} (revision {revision}) are not available: tried {where}: "
                f"{_failure(exc)}; " + _how_to_provide(text)
            ) from exc
        tried = f"{text} (revision {revision}) at {directory}"
    missing = _missing_files(directory)
    if missing:
        raise WeightsUnavailableError(
            f"diffusion weights in {tried} are incomplete: missing {', '.join(missing)} (only safetensors "
            "weights are read); " + _how_to_provide(str(model) if not path.is_dir() else DEFAULT_MODEL)
        )
    return directory


def load_sd2_inpainting(
    model: str | Path = DEFAULT_MODEL,
    *,
    revision: str = "main",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    text_encoder: bool = True,
    image_models: bool = True,
    vae_decoder: bool = True,
    unet_ready: Callable[[Any], None] | None = None,
) -> SD2Components:
    """The pretrained components from a hub id or a local diffusers-format directory (safetensors only);
    ``text_encoder=False`` does not load the text encoder (``None``), ``image_models=False`` neither the
    VAE nor the UNet (every file is still checked first, so a missing one fails before anything loads);
    ``vae_decoder`` and ``unet_ready``: see :func:`load_diffusion_components`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    directory = resolve_weights_dir(
        model, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    safe = {"use_safetensors": True, "local_files_only": True, "variant": weights_variant(directory)}
    try:
        unet = vae = None
        if image_models:
            unet = UNet2DConditionModel.from_pretrained(directory / "unet", torch_dtype=dtype, **safe)
            if unet_ready is not None:
                _placed(unet, torch.device(device), dtype)
                unet_ready(unet)
            vae = AutoencoderKL.from_pretrained(directory / "vae", torch_dtype=dtype, **safe)
            if not vae_decoder:
                _drop_decoder(vae)
        encoder = (
            CLIPTextModel.from_pretrained(
                directory / "text_encoder", dtype=dtype, trust_remote_code=False, **safe
            )
            if text_encoder
            else None
        )
        tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer", local_files_only=True)
        scheduler = _scheduler_from_config(
            json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
        )
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise WeightsUnavailableError(
            f"diffusion weights in {directory} cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    components = SD2Components(vae, unet, encoder, tokenizer, scheduler, source=str(directory))
    return _place(components, torch.device(device), dtype)


def save_components(components: SD2Components, directory: str | Path) -> Path:
    """Write the components as a diffusers-format directory (safetensors weights).

    The inverse of :func:`load_sd2_inpainting`: a seeded random build saved this way stands in for the real
    weights wherever a directory is needed (tests, offline demonstrations).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    components.unet.save_pretrained(directory / "unet", safe_serialization=True)
    components.vae.save_pretrained(directory / "vae", safe_serialization=True)
    if components.text_encoder is None:
        raise ConfigError("the text encoder was released; it cannot be saved")
    components.text_encoder.save_pretrained(directory / "text_encoder", safe_serialization=True)
    components.tokenizer.save_pretrained(directory / "tokenizer")
    components.scheduler.save_pretrained(directory / "scheduler")
    index = {
        "_class_name": "StableDiffusionInpaintPipeline",
        "scheduler": ["diffusers", type(components.scheduler).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return directory


def load_diffusion_components(
    config: MapDiffConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    text_encoder: bool = True,
    image_models: bool = True,
    vae_decoder: bool = True,
    unet_ready: Callable[[Any], None] | None = None,
) -> SD2Components:
    """The components a :class:`~clipfusion.config.MapDiffConfig` names (pretrained or random), placed;
    without the text encoder (``None``) when ``text_encoder`` is False, without the VAE and the UNet when
    ``image_models`` is False. The UNet loads first; ``unet_ready(unet)`` (placed on its device and dtype)
    runs before the VAE loads, so that what it frees of the UNet is gone when the VAE exists; with
    ``vae_decoder=False`` the VAE's decoder is freed as soon as the VAE is loaded (a user that only encodes:
    SD-2's decoder is 0.2 GB in float32)."""
    from clipfusion.runtime import resolve_device, resolve_dtype

    config = config.placed()  # a branch section alone: the package's default placement where unset
    dev = resolve_device(config.device if device is None else device)
    dt = resolve_dtype(config.dtype if dtype is None else dtype, dev)
    if config.weights == "random":
        return build_random_components(
            config.architecture,
            seed=config.init_seed,
            device=dev,
            dtype=dt,
            text_encoder=text_encoder,
            image_models=image_models,
            vae_decoder=vae_decoder,
            unet_ready=unet_ready,
        )
    if config.weights != "pretrained":
        raise ConfigError(f"diffusion.weights must be 'pretrained' or 'random', got {config.weights!r}")
    return load_sd2_inpainting(
        config.model,
        revision=config.revision,
        device=dev,
        dtype=dt,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        text_encoder=text_encoder,
        image_models=image_models,
        vae_decoder=vae_decoder,
        unet_ready=unet_ready,
    )
