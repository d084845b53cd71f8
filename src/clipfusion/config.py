"""Every option of the detector: frozen dataclasses, presets shipped as TOML data files, strict loading.

Every choice the paper leaves open is a named field here with the default METHOD.md gives, so that a user
holding the paper, or running an ablation, changes a value instead of code. Presets live in
``clipfusion/presets/*.toml``: ``paper`` (pretrained weights), ``tiny`` (tiny random models for tests and
the offline demo) and ``random-full`` (full-size random models: the real compute, for benchmarks).

Where a model runs (``device``, ``dtype``) and the size of the maps (``output_size``) are declared once, on
:class:`CLIPFusionConfig`; a branch section may override them (``clip.dtype = "float32"``), otherwise it
inherits them (:meth:`CLIPFusionConfig.branch_configs`).

This module imports neither torch nor the models, so reading or checking a configuration is instant.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Self

from clipfusion.errors import ConfigError, did_you_mean

PRESETS = ("paper", "tiny", "random-full")

#: where a branch gets its weights: the published checkpoint (``checkpoint`` / ``model``) or a seeded
#: random initialisation of the same architecture (``init_seed``)
WEIGHT_SOURCES = ("pretrained", "random")
PATCH_MODES = ("tokens", "crops", "windows")
#: how a memory-bank map measures a feature's distance to its nearest reference feature
DISTANCES = ("cosine", "euclidean")
SCORE_MODES = ("terms", "max")
#: the four component maps, in the order of Eq. 4 (the fusion's ``terms`` picks a subset)
FUSION_TERMS = ("clip_L", "clip_V", "diff_L", "diff_V")
DIFFUSION_ARCHITECTURES = ("sd2-inpainting", "tiny")
DEFAULT_DIFFUSION_MODEL = "stabilityai/stable-diffusion-2-inpainting"
ATTENTION_NORMALISERS = ("prompt", "words", "sequence")

DEFAULT_DEVICE = "auto"
#: resolved per device by :func:`clipfusion.runtime.auto_dtype` (float32, bfloat16 or float16)
DEFAULT_DTYPE = "auto"
DEFAULT_OUTPUT_SIZE = 256
#: the table of a saved configuration that records what ``auto`` resolved to (ignored when reading it back)
RESOLVED_KEY = "resolved"


class _Placement:
    """Shared by the branch sections: ``device``, ``dtype`` and ``output_size`` left unset (None) are
    inherited from the detector's configuration, or take the package defaults for a branch used alone."""

    device: str | None
    dtype: str | None
    output_size: int | None

    def placed(
        self,
        device: str = DEFAULT_DEVICE,
        dtype: str = DEFAULT_DTYPE,
        output_size: int = DEFAULT_OUTPUT_SIZE,
    ) -> Self:
        """A copy with every unset placement option filled from the arguments."""
        return dataclasses.replace(
            self,  # type: ignore[type-var]
            device=self.device if self.device is not None else device,
            dtype=self.dtype if self.dtype is not None else dtype,
            output_size=self.output_size if self.output_size is not None else output_size,
        )


def _check_placement(section: str, config: _Placement, problems: list[str]) -> None:
    if config.output_size is not None and config.output_size < 8:
        problems.append(f"{section}.output_size must be at least 8, got {config.output_size}")
    if config.device is not None and not config.device:
        problems.append(f"{section}.device must not be empty")


@dataclass(frozen=True)
class PatchCLIPConfig(_Placement):
    """The CLIP branch (PatchCLIP). Options the paper leaves open are fields, with METHOD.md's defaults.

    ``model`` is an open_clip architecture (or the shipped ``clipfusion-tiny``). With ``weights =
    "pretrained"``, ``checkpoint`` is an open_clip pretrained tag or a local checkpoint file or folder; with
    ``"random"`` the weights are drawn from ``init_seed``. ``patch_mode``: ``tokens`` (one forward pass,
    per-token maps), ``crops`` (``crop_grid`` × ``crop_grid`` tiles, each encoded as an image) or
    ``windows`` (WinCLIP window embeddings of ``window_size`` × ``window_size`` tokens, aggregated back to
    tokens by the harmonic mean). ``distance``: how ``clip_V`` compares a token with the memory bank.
    """

    model: str = "ViT-B-16-plus-240"
    weights: str = "pretrained"
    checkpoint: str = "laion400m_e31"
    init_seed: int = 0
    image_size: int = 240
    temperature: float = 0.07
    patch_mode: str = "tokens"
    crop_grid: int = 3
    window_size: int = 2
    normalize_prompt_embeddings: bool = False
    distance: str = "cosine"
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    output_size: int | None = None

    def __post_init__(self) -> None:
        # checked here so that a bad value fails where it is given (preset, file, override), not mid-run
        problems: list[str] = []
        _one_of("clip.weights", self.weights, WEIGHT_SOURCES, problems)
        _one_of("clip.patch_mode", self.patch_mode, PATCH_MODES, problems)
        _one_of("clip.distance", self.distance, DISTANCES, problems)
        for name in ("image_size", "crop_grid", "window_size", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"clip.{name} must be at least 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            problems.append(f"clip.temperature must be positive, got {self.temperature}")
        if not self.model:
            problems.append("clip.model must not be empty")
        if self.weights == "pretrained" and not self.checkpoint:
            problems.append("clip.checkpoint must name an open_clip tag or a checkpoint file or folder")
        _check_placement("clip", self, problems)
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class MapDiffConfig(_Placement):
    """The diffusion branch (METHOD.md, MapDiff). With ``weights = "pretrained"``, ``model`` is a hub id or
    a local diffusers-format directory (at ``revision``); ``"random"`` builds ``architecture`` with weights
    drawn from ``init_seed``.

    [ours] choices, each changeable here: ``timestep`` 100, ``n_noise`` 1, ``seed`` 0, ``state_words``
    ("damage",), ``attention_blocks`` (all ``attn2`` of up_blocks.1 and .2), ``feature_blocks`` (output of
    up_blocks.1), ``distance`` (cosine: how ``diff_V`` compares a feature with the memory bank),
    ``attention_normaliser`` ("prompt": the state-word attention divided by the attention on every prompt
    token but the start token, i.e. the words and the end token; "words": the words only; "sequence": all 76
    positions after the start token, padding included) and ``early_exit`` (stop the UNet as soon as every
    layer a map reads has run, and drop the blocks it never reaches when loading; the maps are identical,
    the time and memory are not) and ``channels_last`` (the VAE convolves in NHWC layout: same values up to
    rounding, faster on CPUs and GPUs) and ``compile`` (``torch.compile`` the VAE
    encoder, the largest single cost: a one-off compile of about a minute per batch shape, then about 20 %
    less VAE time on a CPU; off by default) and ``precompute_conditioning`` (once the text encoder is
    released, replace the UNet's timestep-embedding layers and cross-attention key/value projections by
    their outputs for the configured timestep and the cached prompts: 50 M parameters fewer for SD-2, same
    maps to rounding; the branch then runs that timestep only).
    """

    model: str = DEFAULT_DIFFUSION_MODEL
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
    distance: str = "cosine"
    early_exit: bool = True
    channels_last: bool = True
    compile: bool = False
    precompute_conditioning: bool = True
    batch_size: int = 4
    device: str | None = None
    dtype: str | None = None
    output_size: int | None = None

    def __post_init__(self) -> None:
        # value checks only; those that need the model (block names, timestep range) are made by MapDiff
        problems: list[str] = []
        _one_of("diffusion.architecture", self.architecture, DIFFUSION_ARCHITECTURES, problems)
        _one_of("diffusion.weights", self.weights, WEIGHT_SOURCES, problems)
        _one_of("diffusion.attention_normaliser", self.attention_normaliser, ATTENTION_NORMALISERS, problems)
        _one_of("diffusion.distance", self.distance, DISTANCES, problems)
        for name in ("image_size", "n_noise", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"diffusion.{name} must be at least 1, got {getattr(self, name)}")
        if self.timestep < 0:
            problems.append(f"diffusion.timestep must be >= 0, got {self.timestep}")
        if not self.state_words or any(not w.strip() for w in self.state_words):
            problems.append("diffusion.state_words must be a non-empty list of non-empty words")
        if not self.attention_blocks:
            problems.append("diffusion.attention_blocks must name at least one block (diff_L reads them)")
        if not self.feature_blocks:
            problems.append("diffusion.feature_blocks must name at least one block (diff_V reads them)")
        if "{state}" not in self.prompt_template:
            problems.append(
                f"diffusion.prompt_template {self.prompt_template!r} has no {{state}} placeholder"
            )
        else:
            try:
                self.prompt_template.format(object="object", state="state")
            except (KeyError, IndexError, ValueError) as exc:
                problems.append(
                    f"diffusion.prompt_template {self.prompt_template!r} may only use {{object}} and "
                    f"{{state}} ({exc})"
                )
        if not self.model:
            problems.append("diffusion.model must not be empty")
        _check_placement("diffusion", self, problems)
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class CLIPFusionConfig:
    """The whole detector: where it runs, both branches and the fusion of their maps (Eq. 4 and Eq. 9).

    ``terms`` are the component maps the fusion adds up (default all four; a map left out counts as zero
    in Eq. 4 and Eq. 9, and leaving out ``clip_L`` also drops its image term ``s_clip_L``): the paper's
    component ablation as an option, e.g. ``("clip_L", "diff_L")`` for the language-guided maps alone.
    """

    clip: PatchCLIPConfig = field(default_factory=PatchCLIPConfig)
    diffusion: MapDiffConfig = field(default_factory=MapDiffConfig)
    device: str = DEFAULT_DEVICE
    dtype: str = DEFAULT_DTYPE
    output_size: int = DEFAULT_OUTPUT_SIZE
    alpha_map: float = 0.25
    alpha_score: float = 0.75
    sigma: float = 4.0
    score_mode: str = "terms"
    terms: tuple[str, ...] = FUSION_TERMS
    use_clip: bool = True
    use_diffusion: bool = True
    object_names: dict[str, str] = field(default_factory=dict)
    preset: str = "paper"

    def __post_init__(self) -> None:
        # values that would silently give wrong maps are refused before any model is loaded
        problems: list[str] = []
        for name in ("alpha_map", "alpha_score"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name} must lie in [0, 1], got {value}")
        if self.sigma < 0:
            problems.append(f"sigma must be >= 0, got {self.sigma}")
        if self.output_size < 8:
            problems.append(f"output_size must be at least 8, got {self.output_size}")
        _one_of("score_mode", self.score_mode, SCORE_MODES, problems)
        unknown = [t for t in self.terms if t not in FUSION_TERMS]
        if not self.terms or unknown or len(set(self.terms)) != len(self.terms):
            problems.append(
                f"terms must be distinct names among {', '.join(FUSION_TERMS)}, got {list(self.terms)}"
            )
        if not self.device:
            problems.append("device must not be empty")
        if not (self.use_clip or self.use_diffusion):
            problems.append("use_clip and use_diffusion are both false: nothing would be computed")
        if problems:
            raise ConfigError("; ".join(problems))

    def branch_configs(self) -> tuple[PatchCLIPConfig, MapDiffConfig]:
        """The two branch sections with the placement they inherit filled in: what the branches are built
        from."""
        placement = {"device": self.device, "dtype": self.dtype, "output_size": self.output_size}
        return self.clip.placed(**placement), self.diffusion.placed(**placement)

    @property
    def random_weights(self) -> bool:
        """True when any branch in use has random weights: its scores demonstrate the pipeline only."""
        return (self.use_clip and self.clip.weights == "random") or (
            self.use_diffusion and self.diffusion.weights == "random"
        )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **overrides: Any) -> CLIPFusionConfig:
        """A copy with overrides; dotted keys reach into branches (``{"clip.patch_mode": "crops"}``)."""
        return with_overrides(self, overrides)


def check_batch_size(batch_size: Any, option: str = "batch_size") -> int | None:
    """A batch size as given (``None``: the caller's default), refusing anything but a positive integer
    with one line naming ``option`` (``batch_size``, ``--batch-size``): every entry point (the detector,
    the branches, the server, the Ray engine, a grid) checks through here."""
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ConfigError(f"{option} must be at least 1 (a whole number), got {batch_size!r}")
    return batch_size


def _one_of(name: str, value: str, choices: tuple[str, ...], problems: list[str]) -> None:
    if value not in choices:
        problems.append(f"{name} must be one of {', '.join(choices)}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# generic dataclass <-> dict conversion with validation


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (tuples become lists, unset optional values are left out), so it is
    JSON and TOML ready and reads back to an equal configuration."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
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
        hint = did_you_mean(unknown[0], names) if len(unknown) == 1 else ""
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; {hint}known: {known}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:
        # ``X | None``: None means "inherit"; anything else must be an X
        if value is None:
            return None
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _coerce(inner, value, where)
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
    names = _field_names(type(config))
    for key, value in overrides.items():
        parts = key.split(".")
        target, known = data, names
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(known.get(part), dict):
                raise _unknown_option(key, names, parts[:depth])
            target, known = target.setdefault(part, {}), known[part]
        if parts[-1] not in known or isinstance(known[parts[-1]], dict):
            raise _unknown_option(key, names, parts[:-1])
        target[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return from_dict(type(config), data)


def _dotted(names: dict[str, Any], prefix: str = "") -> list[str]:
    """Every option a ``--set`` key can name (``alpha_map``, ``clip.patch_mode`` …)."""
    out = []
    for name, inner in names.items():
        out += _dotted(inner, f"{prefix}{name}.") if isinstance(inner, dict) else [f"{prefix}{name}"]
    return out


def _unknown_option(key: str, names: dict[str, Any], section: list[str]) -> ConfigError:
    """One line: the closest options to a mistyped key, then the options of the section it names."""
    level = names
    for part in section:
        level = level[part]
    prefix = "".join(f"{p}." for p in section)
    here = [f"{prefix}{n}" + (".*" if isinstance(v, dict) else "") for n, v in level.items()]
    where = f"{prefix[:-1]} options" if section else "options"
    return ConfigError(
        f"unknown option {key!r}; {did_you_mean(key, _dotted(names))}{where}: {', '.join(here)}"
    )


def _field_names(cls: type) -> dict[str, Any]:
    """``{name: None or the nested names}`` of a config dataclass, for validating dotted keys."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: _field_names(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else None
        for f in dataclasses.fields(cls)
    }


def parse_value(text: str) -> Any:
    """An override's value: JSON when it parses (numbers, booleans, lists, null), otherwise a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: Iterable[str], option: str = "--set") -> dict[str, Any]:
    """``["alpha_map=0.3", "clip.patch_mode=crops"]`` → ``{"alpha_map": 0.3, "clip.patch_mode": "crops"}``."""
    overrides: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_value(value.strip())
    return overrides


# ---------------------------------------------------------------------------------------------------------
# presets and files


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(
            f"unknown preset {name!r}; {did_you_mean(name, PRESETS)}choose one of {', '.join(PRESETS)}"
        )
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
    if isinstance(data, dict):
        data.pop(RESOLVED_KEY, None)  # a record of where the file was written; the options are the rest
    return from_dict(CLIPFusionConfig, data, where=str(path))


def save_config(
    config: CLIPFusionConfig, path: str | Path, *, resolved: dict[str, Any] | None = None
) -> Path:
    """Write ``.json`` or ``.toml`` (chosen by the suffix), atomically.

    ``resolved`` (what ``"auto"`` resolved to where the file was written, see
    :func:`clipfusion.runtime.resolve_placement`) is stored as a ``resolved`` table beside the options: a
    record of the run, not an option, so :func:`load_config` ignores it.
    """
    from clipfusion.files import atomic_write_bytes

    path = Path(path)
    data = config.to_dict()
    if resolved:
        data[RESOLVED_KEY] = resolved
    if path.suffix.lower() == ".json":
        payload = json.dumps(data, indent=2).encode()
    elif path.suffix.lower() == ".toml":
        import tomli_w

        payload = tomli_w.dumps(data).encode()
    else:
        raise ConfigError(f"{path}: configuration files must end in .json or .toml")
    atomic_write_bytes(path, payload)
    return path
