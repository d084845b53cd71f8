"""``clipfusion evaluate --grid``: a grid over the options that change the diffusion maps, for about the
cost of one run.

The paper's Table 5 asks which timestep and which UNet block the memory-bank features come from; each such
point is a full evaluation, but most of its work is shared with the others. Here, per category:

* the VAE latents of every image (queries and references) are computed once for the whole grid
  (:class:`LatentCache`: in memory up to a limit, then streamed to files), in the same batches as a plain run;
* per timestep, one UNet pass per batch, state word and noise draw serves every grid point at that timestep:
  forward hooks on every requested feature block and attention capture on every requested layer, the pass
  stopping after the last of them; each point's ``diff_L`` and ``diff_V`` are then read from that pass
  through :meth:`MapDiff.maps_from_passes`, the code :meth:`MapDiff.predict` uses;
* the UNet pass of a query serves every run of its category (shot counts and seeds differ only in the
  memory bank), and the CLIP maps are computed once per run for all grid points.

Each grid point is stored as an ordinary evaluation in its own folder (``results.*``, ``summary.md`` and
``maps/*.npz``, so ``clipfusion sweep`` works on it and ``evaluate --resume`` would accept it); the grid
folder gets ``grid.json`` and ``table.md`` / ``table.png`` (Table-5 style: rows timestep, columns block,
cells pixel AUROC / AUPRO / image AUROC, mean over categories). A point's results equal those of a
separate ``evaluate`` with its configuration (same references). One exception, at float rounding: a
captured attention layer computes its attention explicitly instead of with the fused kernel (2e-7 apart),
so when points differ in ``attention_blocks``, a feature block *after* a layer that only another point
captures sees that layer's rounding.

Results are saved per category and timestep as they finish; ``resume`` continues an interrupted grid,
skipping every (point, run) already saved with its maps.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipfusion.config import CLIPFusionConfig
from clipfusion.data.datasets import dataset_categories
from clipfusion.errors import ConfigError
from clipfusion.evaluation.grid.engine import GridEngine
from clipfusion.evaluation.grid.points import GridPoint, grid_config_points
from clipfusion.evaluation.grid.table import write_grid_table
from clipfusion.evaluation.gridspec import Grid, value_text
from clipfusion.evaluation.maps_store import clear_maps_files, maps_file
from clipfusion.evaluation.protocol import check_dataset, run_header, run_plan
from clipfusion.evaluation.results import ResultStore, RunKey
from clipfusion.files import atomic_write_text
from clipfusion.provenance import RANDOM_ABLATION_NOTE

GRID_FILE = "grid.json"
DEFAULT_LATENT_MEMORY_MB = 1024


@dataclass
class GridResult:
    out_dir: Path
    points: list[GridPoint]
    runs: dict[str, list[dict[str, Any]]]  # folder name → its results.json runs
    #: seconds inside the models (VAE, UNet, CLIP) and the map arithmetic, summed over the grid
    model_seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def evaluate_grid(
    kind: str,
    root: str | Path,
    out_dir: str | Path,
    *,
    config: CLIPFusionConfig,
    grid: Grid,
    categories: Sequence[str] | None = None,
    shots: Sequence[int] = (0,),
    seeds: Sequence[int] = (0,),
    resume: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    detector_factory: Callable[[CLIPFusionConfig], Any] | None = None,
    log: Callable[[str], None] = print,
    note: str = "",
    skip_bad: bool = False,
    weights_dir: str | Path | None = None,
    latent_memory_mb: float = DEFAULT_LATENT_MEMORY_MB,
) -> GridResult:
    """Evaluate every point of ``grid`` (options in :data:`~clipfusion.evaluation.gridspec.MAP_OPTIONS`)
    over the protocol, sharing the work the points have in common (see the module docstring).

    ``note`` heads every table (each point's ``summary.md`` and ``table.md``); with random weights and no
    note, a warning that the numbers check the pipeline only.
    """
    out_dir = Path(out_dir)
    if not note and config.random_weights:
        # every table of a random-weight grid says what its numbers are worth
        note = f"**{RANDOM_ABLATION_NOTE}**"
    if latent_memory_mb < 0:
        raise ConfigError(f"--latent-memory-mb must be >= 0, got {latent_memory_mb}")
    points = grid_config_points(config, grid, out_dir)
    names = dataset_categories(kind, root, categories)
    plan = run_plan(names, shots, seeds)
    splits, skipped = check_dataset(kind, root, names, shots, skip_bad=skip_bad, progress=progress)
    for line in skipped:
        log(f"skipped: {line}")

    stores: dict[int, ResultStore] = {}
    todo: dict[int, set[RunKey]] = {}
    for point in points:
        header = run_header(kind, root, point.config, shots, seeds, skipped)
        stores[point.index] = ResultStore(point.folder, header, resume, note=note)
        if not resume:
            clear_maps_files(point.folder)
        done = {
            key
            for key in stores[point.index].done()
            if maps_file(point.folder, key.category, key.shots, key.seed).is_file()
        }
        todo[point.index] = {key for key in plan if key not in done}
        stores[point.index].save()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out_dir / GRID_FILE,
        json.dumps(_grid_json(grid, points, config, kind, root, shots, seeds), indent=2) + "\n",
    )
    n_todo = sum(len(keys) for keys in todo.values())
    if resume and n_todo < len(plan) * len(points):
        log(
            f"resuming: {len(plan) * len(points) - n_todo} of {len(plan) * len(points)} runs of the grid "
            "points already done"
        )

    result = GridResult(out_dir, points, {})
    if n_todo:
        engine = GridEngine(
            config,
            points,
            detector_factory=detector_factory,
            weights_dir=weights_dir,
            batch_size=batch_size,
            latent_memory=int(latent_memory_mb * 2**20),
            spill_parent=out_dir,
            log=log,
        )
        try:
            engine.prepare([key.category for key in plan if any(key in todo[p.index] for p in points)])
            for category in names:
                keys = [key for key in plan if key.category == category]
                if not any(key in todo[p.index] for p in points for key in keys):
                    continue
                engine.run_category(
                    category, keys, splits[category], todo, stores, kind=kind, root=root, progress=progress
                )
        finally:
            engine.close()
        result.model_seconds = dict(engine.seconds)
        result.counts = dict(engine.counts)
    result.runs = {p.folder.name: stores[p.index].runs for p in points}
    result.files = write_grid_table(out_dir, points, result.runs, grid, note=note)
    return result


def _grid_json(
    grid: Grid,
    points: list[GridPoint],
    config: CLIPFusionConfig,
    kind: str,
    root: str | Path,
    shots: Sequence[int],
    seeds: Sequence[int],
) -> dict[str, Any]:
    return {
        "grid": {k: [value_text(v) for v in values] for k, values in grid.items()},
        "points": [
            {"folder": p.folder.name, "values": {k: value_text(v) for k, v in p.values.items()}}
            for p in points
        ],
        "dataset": kind,
        "root": str(Path(root).resolve()),
        "protocol": {"shots": list(shots), "seeds": list(seeds)},
        "config": config.to_dict(),
        "random_weights": config.random_weights,
    }


__all__ = ["DEFAULT_LATENT_MEMORY_MB", "GRID_FILE", "GridResult", "evaluate_grid"]
