"""The points of a grid over diffusion options: each point's values, its full configuration and its folder,
and the one configuration the grid's detector is built with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clipfusion.config import CLIPFusionConfig
from clipfusion.errors import ConfigError
from clipfusion.evaluation.gridspec import (
    MAP_OPTIONS,
    Grid,
    Point,
    apply_point,
    grid_points,
    point_dirname,
    point_label,
)


@dataclass(frozen=True)
class GridPoint:
    """One point of the grid: its values, the full configuration and the folder its run is stored in."""

    index: int
    values: Point
    config: CLIPFusionConfig
    folder: Path

    @property
    def timestep(self) -> int:
        return self.config.diffusion.timestep

    @property
    def label(self) -> str:
        return point_label(self.values)


def grid_config_points(config: CLIPFusionConfig, grid: Grid, out_dir: Path) -> list[GridPoint]:
    unknown = [k for k in grid if k not in MAP_OPTIONS]
    if unknown:
        raise ConfigError(
            f"evaluate --grid takes options that change the maps ({', '.join(MAP_OPTIONS)}); "
            f"{', '.join(unknown)} only changes the fusion: evaluate once with --save-maps, then "
            "`clipfusion sweep`"
        )
    if not grid:
        raise ConfigError("evaluate --grid: no grid given")
    if not config.use_diffusion:
        raise ConfigError("a grid over diffusion options needs the diffusion branch (use_diffusion = true)")
    points = []
    for index, values in enumerate(grid_points(grid)):
        points.append(GridPoint(index, values, apply_point(config, values), out_dir / point_dirname(values)))
    return points


def build_config(config: CLIPFusionConfig, points: Sequence[GridPoint]) -> CLIPFusionConfig:
    """The configuration the grid's detector is built with: the base one, with the union of every point's
    feature and attention blocks (:func:`clipfusion.shared.shared_config`, the rule shared models follow).

    The one place that decides which UNet blocks the built model must keep: a MapDiff built for early exit
    may leave out the modules after the last block its configuration reads, and every block any grid point
    reads must stay reachable. The grid passes each point's own blocks and layers to every step; the built
    configuration only decides what is built. Points at another timestep than the base one need the UNet's
    timestep layers themselves, not their outputs at one timestep (``precompute_conditioning`` off).
    """
    from clipfusion.shared import shared_config

    return shared_config([p.config for p in points], base=config)


__all__ = ["GridPoint", "build_config", "grid_config_points"]
