"""Grids of options for ablations: ``--grid KEY=V1,V2,...`` parsed, expanded and named.

Syntax: a comma separates the values of one option; for an option whose value is a list (``terms``,
``diffusion.feature_blocks``, ``diffusion.attention_blocks``, ``diffusion.state_words``) a plus sign joins
the items of one value. So ``--grid diffusion.feature_blocks=up_blocks.0,up_blocks.1`` is two grid points
with one block each, ``--grid diffusion.feature_blocks=up_blocks.1+up_blocks.2`` one point reading both
blocks, and ``--grid terms=clip_L,clip_L+clip_V,all`` three points (``all``: the four maps). Several
``--grid`` options make the Cartesian product, the first option varying slowest.

Two kinds of options are gridded: those that only change the fusion (:data:`FUSION_OPTIONS`: recomputed
from stored maps by ``clipfusion sweep``, no model) and those that change the diffusion maps
(:data:`MAP_OPTIONS`: ``clipfusion evaluate --grid``, sharing the VAE, the UNet passes and CLIP).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from clipfusion.config import FUSION_TERMS, CLIPFusionConfig, parse_value
from clipfusion.errors import ConfigError, did_you_mean

FUSION_OPTIONS = ("alpha_map", "alpha_score", "sigma", "score_mode", "terms")
MAP_OPTIONS = (
    "diffusion.timestep",
    "diffusion.feature_blocks",
    "diffusion.attention_blocks",
    "diffusion.state_words",
)
LIST_OPTIONS = frozenset(
    {"terms", "diffusion.feature_blocks", "diffusion.attention_blocks", "diffusion.state_words"}
)

Grid = dict[str, list[Any]]
Point = dict[str, Any]


def parse_grid(items: Sequence[str], allowed: Sequence[str], *, other: str = "") -> Grid:
    """``["alpha_map=0,0.5", "terms=clip_L+diff_L,all"]`` → ``{"alpha_map": [0, 0.5], "terms": [...]}``.

    Keys outside ``allowed`` are refused with ``other`` appended (where that option can be gridded instead).
    """
    grid: Grid = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected KEY=VALUE1,VALUE2,...")
        key, text = (part.strip() for part in item.split("=", 1))
        if key not in allowed:
            hint = f"; {other}" if other else ""
            raise ConfigError(
                f"--grid {key}: cannot be gridded here ({did_you_mean(key, allowed)}choose from "
                f"{', '.join(allowed)}){hint}"
            )
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one option")
        values = [v.strip() for v in text.split(",")]
        if not text or any(not v for v in values):
            raise ConfigError(f"--grid {item!r}: empty value")
        parsed = [_parse_one(key, v) for v in values]
        if len(set(map(value_text, parsed))) != len(parsed):
            raise ConfigError(f"--grid {key}: a value is repeated")
        grid[key] = parsed
    return grid


def _parse_one(key: str, text: str) -> Any:
    if key in LIST_OPTIONS:
        if key == "terms" and text == "all":
            return FUSION_TERMS
        items = tuple(part.strip() for part in text.split("+"))
        if any(not part for part in items):
            raise ConfigError(f"--grid {key}: empty item in {text!r}")
        return items
    return parse_value(text)


def grid_points(grid: Grid) -> list[Point]:
    """Every combination, the first option varying slowest (``{}`` alone for an empty grid)."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def apply_point(config: CLIPFusionConfig, point: Point) -> CLIPFusionConfig:
    """The configuration of one grid point (validated: a bad value names the point)."""
    try:
        return config.replace(**{k: list(v) if isinstance(v, tuple) else v for k, v in point.items()})
    except ConfigError as exc:
        raise ConfigError(f"grid point {point_label(point)}: {exc}") from exc


def value_text(value: Any) -> str:
    """A grid value as the command line writes it (lists joined by ``+``)."""
    if isinstance(value, tuple | list):
        return "+".join(str(v) for v in value)
    return str(value)


def config_value(config: CLIPFusionConfig, key: str) -> Any:
    """The value of a (dotted) option in a configuration, lists as tuples."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return tuple(value) if isinstance(value, list) else value


def short_key(key: str) -> str:
    return key.split(".")[-1]


def point_label(point: Point) -> str:
    return " ".join(f"{short_key(k)}={value_text(v)}" for k, v in point.items()) or "(stored configuration)"


def point_dirname(point: Point) -> str:
    """A folder name for a grid point: ``timestep-50_feature_blocks-up_blocks.0``."""
    import re

    parts = [f"{short_key(k)}-{value_text(v)}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", "_".join(parts)) or "base"


__all__ = [
    "FUSION_OPTIONS",
    "LIST_OPTIONS",
    "MAP_OPTIONS",
    "apply_point",
    "config_value",
    "grid_points",
    "parse_grid",
    "point_dirname",
    "point_label",
    "value_text",
]
