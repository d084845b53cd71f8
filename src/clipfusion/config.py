"""Configuration: frozen dataclasses, presets shipped as TOML data files, JSON/TOML round trips.

Every choice the paper leaves open is a named field here with the default METHOD.md gives, so that a user
holding the paper, or running an ablation, changes a value instead of code. Presets live in
``clipfusion/presets/*.toml``: ``paper`` (pretrained weights), ``tiny`` (tiny random models for tests and
the offline demo) and ``random-full`` (full-size random models: the real compute, for benchmarks).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from clipfusion.errors import ConfigError

PRESETS = ("paper", "tiny", "random-full")


@dataclass(frozen=True)
class PatchCLIPConfig:
    """The CLIP branch (PatchCLIP). Options the paper leaves open are fields, with METHOD.md's defaults.

    ``model`` is an open_clip architecture (or the shipped ``clipfusion-tiny``); ``pretrained`` an open_clip
    tag, a local checkpoint file or folder, or ``"random"`` (weights drawn from ``init_seed``).
    ``patch_mode``: ``tokens`` (one forward pass, per-token maps), ``crops`` (``crop_grid`` ×
    ``crop_grid`` tiles, each encoded as an image) or ``windows`` (WinCLIP window embeddings of
    ``window_size`` × ``window_size`` tokens, aggregated back to tokens by the harmonic mean).
    """

    model: str = "ViT-B-16-plus-240"
    pretrained: str = "laion400m_e31"
    init_seed: int = 0
    image_size: int = 240
    temperature: float = 0.07
    patch_mode: str = "tokens"
    crop_grid: int = 3
    window_size: int = 2
    normalize_prompt_embeddings: bool = False
    output_size: int = 256
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # checked here so that a bad value fails where it is given (preset, file, override), not mid-run
        if self.patch_mode not in PATCH_MODES:
            raise ConfigError(f"clip.patch_mode {self.patch_mode!r} is not one of {', '.join(PATCH_MODES)}")
        for name in ("image_size", "crop_grid", "window_size", "output_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"clip.{name} must be at least 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ConfigError(f"clip.temperature must be positive, got {self.temperature}")
        if not self.model or not self.pretrained:
            raise ConfigError("clip.model and clip.pretrained must not be empty")


PATCH_MODES = ("tokens", "crops", "windows")


@dataclass(frozen=True)
class MapDiffConfig:
    """The diffusion branch (METHOD.md, MapDiff). ``weights = "random"`` builds the architecture with seeded
    random weights; ``model`` is a hub id or a local diffusers-format directory.

    [ours] choices, each changeable here: ``timestep`` 100, ``n_noise`` 1, ``seed`` 0, ``state_words``
    ("damage",), ``attention_blocks`` (all ``attn2`` of up_blocks.1 and .2), ``feature_blocks`` (output of
    up_blocks.1), ``attention_normaliser`` ("prompt": the state-word attention divided by the attention on
    every prompt token but the start token, i.e. the words and the end token; "words": the words only;
    "sequence": all 76 positions after the start token, padding included) and ``early_exit`` (stop the UNet
    after the last block a map reads; the maps are identical, the time is not) and ``channels_last`` (the VAE
    convolves in NHWC layout: same values up to rounding, faster on CPUs and GPUs) and ``compile``
    (``torch.compile`` the VAE encoder, the largest single cost: a one-off compile of about a minute per
    batch shape, then about 20 % less VAE time on a CPU; off by default).
    """

    model: str = "stabilityai/stable-diffusion-2-inpainting"
    revision: str = "main"
    architecture: str = "sd2-inpainting"
    weights: str = "pretrained"
    init_seed: int = 0
    image_size: int = 512
    timestep: int = 100
    n_noise: int = 1
    seed: int = 0
    state_words: tuple[str, ...] = ("damage",)
    prompt_template: str = "a close-up cropped png photo of a {object} with {state}"
    attention_blocks: tuple[str, ...] = ("up_blocks.1", "up_blocks.2")
    feature_blocks: tuple[str, ...] = ("up_blocks.1",)
    attention_normaliser: str = "prompt"
    early_exit: bool = True
    channels_last: bool = True
    compile: bool = False
    output_size: int = 256
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "float32"

    ARCHITECTURES: typing.ClassVar[tuple[str, ...]] = ("sd2-inpainting", "tiny")
    WEIGHTS: typing.ClassVar[tuple[str, ...]] = ("pretrained", "random")
    ATTENTION_NORMALISERS: typing.ClassVar[tuple[str, ...]] = ("prompt", "words", "sequence")

    def __post_init__(self) -> None:
        # value checks only; those that need the model (block names, timestep range) are made by MapDiff
        problems = []
        if self.architecture not in self.ARCHITECTURES:
            known = ", ".join(self.ARCHITECTURES)
            problems.append(f"architecture {self.architecture!r} is not one of {known}")
        if self.weights not in self.WEIGHTS:
            problems.append(f"weights {self.weights!r} is not one of {', '.join(self.WEIGHTS)}")
        if self.attention_normaliser not in self.ATTENTION_NORMALISERS:
            problems.append(
                f"attention_normaliser {self.attention_normaliser!r} is not one of "
                + ", ".join(self.ATTENTION_NORMALISERS)
            )
        for name in ("image_size", "n_noise", "output_size", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.timestep < 0:
            problems.append(f"timestep must be >= 0, got {self.timestep}")
        if not self.state_words or any(not w.strip() for w in self.state_words):
            problems.append("state_words must be a non-empty list of non-empty words")
        if not self.attention_blocks:
            problems.append("attention_blocks must name at least one block (diff_L reads them)")
        if not self.feature_blocks:
            problems.append("feature_blocks must name at least one block (diff_V reads them)")
        if "{state}" not in self.prompt_template:
            problems.append(f"prompt_template {self.prompt_template!r} has no {{state}} placeholder")
        else:
            try:
                self.prompt_template.format(object="object", state="state")
            except (KeyError, IndexError, ValueError) as exc:
                problems.append(
                    f"prompt_template {self.prompt_template!r} may only use {{object}} and {{state}} ({exc})"
                )
        if not self.model:
            problems.append("model must not be empty")
        if problems:
            raise ConfigError("diffusion." + "; diffusion.".join(problems))


@dataclass(frozen=True)
class CLIPFusionConfig:
    """The whole detector: both branches and the fusion of their maps (paper's Eq. 4 and Eq. 9)."""

    clip: PatchCLIPConfig = field(default_factory=PatchCLIPConfig)
    diffusion: MapDiffConfig = field(default_factory=MapDiffConfig)
    alpha_map: float = 0.25
    alpha_score: float = 0.75
    sigma: float = 4.0
    output_size: int = 256
    score_mode: str = "terms"
    use_clip: bool = True
    use_diffusion: bool = True
    object_names: dict[str, str] = field(default_factory=dict)
    preset: str = "paper"

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **overrides: Any) -> CLIPFusionConfig:
        """A copy with overrides; dotted keys reach into branches (``{"clip.patch_mode": "crops"}``)."""
        return with_overrides(self, overrides)


# ---------------------------------------------------------------------------------------------------------
# generic dataclass <-> dict conversion with validation


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (tuples become lists, so it is JSON and TOML ready)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        out[f.name] = value
    return out


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build a config dataclass from a dict, refusing unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of options, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        known = ", ".join(sorted(names))
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {known}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            value = [value]
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(item, v, where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def with_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """Apply ``{"alpha_map": 0.3, "clip.dtype": "bfloat16"}``-style overrides, validating each one."""
    data = to_dict(config)
    for key, value in overrides.items():
        parts = key.split(".")
        target = data
        for part in parts[:-1]:
            if part not in target or not isinstance(target[part], dict):
                raise ConfigError(f"unknown option {key!r}")
            target = target[part]
        if parts[-1] not in target:
            raise ConfigError(f"unknown option {key!r}")
        target[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return from_dict(type(config), data)


# ---------------------------------------------------------------------------------------------------------
# presets and files


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Path(str(resources.files("clipfusion") / "presets" / f"{name}.toml"))


def load_preset(name: str) -> CLIPFusionConfig:
    with preset_path(name).open("rb") as fh:
        data = tomllib.load(fh)
    return from_dict(CLIPFusionConfig, data, where=f"preset {name}")


def load_config(path: str | Path) -> CLIPFusionConfig:
    """Read a configuration saved as ``.json`` or ``.toml``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration ({exc.strerror or exc})") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw)
        elif path.suffix.lower() == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            raise ConfigError(f"{path}: configuration files must end in .json or .toml")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    return from_dict(CLIPFusionConfig, data, where=str(path))


def save_config(config: CLIPFusionConfig, path: str | Path) -> Path:
    """Write ``.json`` or ``.toml`` (chosen by the suffix), atomically."""
    from clipfusion.io_utils import atomic_write_bytes

    path = Path(path)
    data = config.to_dict()
    if path.suffix.lower() == ".json":
        payload = json.dumps(data, indent=2).encode()
    elif path.suffix.lower() == ".toml":
        import tomli_w

        payload = tomli_w.dumps(data).encode()
    else:
        raise ConfigError(f"{path}: configuration files must end in .json or .toml")
    atomic_write_bytes(path, payload)
    return path
