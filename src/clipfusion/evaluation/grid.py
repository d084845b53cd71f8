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

import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
    short_key,
    value_text,
)
from clipfusion.evaluation.results import METRIC_COLUMNS, ResultStore, RunKey

GRID_FILE = "grid.json"
DEFAULT_LATENT_MEMORY_MB = 1024


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


class LatentCache:
    """VAE latents of image batches, keyed by the batch's image paths (a batch is encoded as a plain run
    encodes it, so the latents are the same numbers).

    Kept in host memory up to ``memory_limit`` bytes; beyond that each batch is written to a file in
    ``spill_dir`` (``torch.save`` of a plain tensor, read back with ``weights_only=True``) and read when
    needed, so a large test split slows down instead of failing. The caller moves them to its device.
    """

    def __init__(self, memory_limit: int, spill_dir: Path) -> None:
        self.memory_limit = int(memory_limit)
        self.spill_dir = spill_dir
        self._memory: dict[tuple[str, ...], Any] = {}
        self._files: dict[tuple[str, ...], Path] = {}
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0
        self.encoded = 0  # images encoded
        self.reused = 0  # images served from the cache

    def get(self, key: tuple[str, ...], compute: Callable[[], Any]) -> Any:
        import torch

        if key in self._memory:
            self.reused += len(key)
            return self._memory[key]
        if key in self._files:
            self.reused += len(key)
            return torch.load(self._files[key], weights_only=True)
        latents = compute()
        self.encoded += len(key)
        stored = latents.detach().cpu()
        size = stored.numel() * stored.element_size()
        if self.bytes_in_memory + size <= self.memory_limit:
            self._memory[key] = stored  # host memory: a GPU run keeps its device memory for the models
            self.bytes_in_memory += size
        else:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha1("\0".join(key).encode()).hexdigest()
            path = self.spill_dir / f"{name}.pt"
            torch.save(stored.clone(), path)
            self._files[key] = path
            self.bytes_on_disk += size
        return latents

    def clear(self) -> None:
        self._memory.clear()
        for path in self._files.values():
            path.unlink(missing_ok=True)
        self._files.clear()
        self.bytes_in_memory = 0


@dataclass
class GridResult:
    out_dir: Path
    points: list[GridPoint]
    runs: dict[str, list[dict[str, Any]]]  # folder name → its results.json runs
    #: seconds inside the models (VAE, UNet, CLIP) and the map arithmetic, summed over the grid
    model_seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


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
    feature and attention blocks (in the order the points give them).

    The one place that decides which UNet blocks the built model must keep: a MapDiff built for early exit
    may leave out the modules after the last block its configuration reads, and every block any grid point
    reads must stay reachable. The grid passes each point's own blocks and layers to every step; the built
    configuration only decides what is built. Points at another timestep than the base one need the UNet's
    timestep layers themselves, not their outputs at one timestep (``precompute_conditioning`` off).
    """
    feature = tuple(dict.fromkeys(b for p in points for b in p.config.diffusion.feature_blocks))
    attention = tuple(dict.fromkeys(b for p in points for b in p.config.diffusion.attention_blocks))
    one_timestep = all(p.config.diffusion.timestep == config.diffusion.timestep for p in points)
    return config.replace(
        **{
            "diffusion.feature_blocks": feature,
            "diffusion.attention_blocks": attention,
            "diffusion.precompute_conditioning": config.diffusion.precompute_conditioning and one_timestep,
        }
    )


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
    from clipfusion.data.datasets import dataset_categories
    from clipfusion.evaluation.maps_store import clear_maps_files, maps_file
    from clipfusion.evaluation.protocol import check_dataset, run_header, run_plan
    from clipfusion.outputs.files import atomic_write_text

    out_dir = Path(out_dir)
    if not note and config.random_weights:
        from clipfusion.evaluation.sweep import RANDOM_NOTE

        note = f"**{RANDOM_NOTE}**"  # every table of a random-weight grid says what its numbers are worth
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
        engine = _GridEngine(
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


class _GridEngine:
    """The models and the shared work of one grid evaluation."""

    def __init__(
        self,
        config: CLIPFusionConfig,
        points: list[GridPoint],
        *,
        detector_factory: Callable[[CLIPFusionConfig], Any] | None,
        weights_dir: str | Path | None,
        batch_size: int | None,
        latent_memory: int,
        spill_parent: Path,
        log: Callable[[str], None],
    ) -> None:
        from clipfusion.branches.attention import cross_attention_layers
        from clipfusion.branches.mapdiff import MapDiff

        built = build_config(config, points)  # every block of every point reachable in the built UNet
        if detector_factory is None:
            from clipfusion.detector import CLIPFusion

            detector = CLIPFusion(built, weights_dir=weights_dir)
        else:
            detector = detector_factory(built)
        if not isinstance(detector.diffusion, MapDiff):
            raise ConfigError("a grid over diffusion options needs the MapDiff diffusion branch")
        self.detector = detector
        self.diffusion: MapDiff = detector.diffusion
        self.clip = detector.clip
        self.points = points
        self.log = log
        self.config = config
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size or detector.default_batch_size
        for point in points:
            self.diffusion.check_config(point.config.diffusion)
        self.layers = {
            p.index: cross_attention_layers(self.diffusion.unet, p.config.diffusion.attention_blocks)
            for p in points
        }
        self.words = list(dict.fromkeys(w for p in points for w in p.config.diffusion.state_words))
        self.spill_dir = Path(tempfile.mkdtemp(prefix=".latents-", dir=spill_parent))
        self.cache = LatentCache(latent_memory, self.spill_dir)
        self.seconds = {"vae": 0.0, "unet": 0.0, "clip": 0.0, "maps": 0.0}
        self.counts = {"vae_images": 0, "unet_images": 0, "clip_images": 0}

    def close(self) -> None:
        self.cache.clear()
        shutil.rmtree(self.spill_dir, ignore_errors=True)

    def prepare(self, categories: Sequence[str]) -> None:
        """Every prompt of every category and state word, then the text encoders are freed."""
        from clipfusion.data import object_name

        names = [object_name(c, self.config.object_names) for c in dict.fromkeys(categories)]
        self.detector.prepare(dict.fromkeys(categories))
        for name in names:
            for word in self.words:
                self.diffusion.prompt_embeddings(name, word)
        self.detector.release_text_encoders()

    # -- shared work ------------------------------------------------------------------------------------
    def _load(self, samples: Sequence[Any]) -> list[Any]:
        from clipfusion.detector import _as_image

        return [_as_image(s.image_path)[0] for s in samples]

    def _latents(self, samples: Sequence[Any]) -> Any:
        md = self.diffusion

        def encode() -> Any:
            start = time.perf_counter()
            z0 = md.encode_latents(md.preprocess(self._load(samples)))
            self.seconds["vae"] += time.perf_counter() - start
            self.counts["vae_images"] += len(samples)
            return z0

        return self.cache.get(tuple(str(s.image_path) for s in samples), encode).to(md.device)

    def _unet(
        self, z0: Any, timestep: int, *, layers: list[str], blocks: list[str]
    ) -> dict[tuple[str, int], Any]:
        """Every (state word, draw) pass of one batch at one timestep, capturing what any point reads."""
        md = self.diffusion
        start = time.perf_counter()
        captures = {}
        for draw in range(md.config.n_noise):
            sample = md.unet_input(z0, draw, timestep=timestep)
            for word in self.words_at:
                embeddings = md.prompt_embeddings(self.object_name, word)
                captures[(word, draw)] = md.run_unet(
                    sample, embeddings, attention_layers=layers, feature_blocks=blocks, timestep=timestep
                )
        self.seconds["unet"] += time.perf_counter() - start
        self.counts["unet_images"] += int(z0.shape[0]) * len(captures)
        return captures

    def _clip_components(self, references: list[Any], test_chunks: list[list[Any]]) -> dict[str, Any]:
        import torch

        if self.clip is None:
            return {}
        start = time.perf_counter()
        self.clip.fit(self.object_name, self._load(references))
        parts: dict[str, list[Any]] = {}
        for chunk in test_chunks:
            produced = self.clip.predict(self._load(chunk), batch_size=self.batch_size, native=True)
            for key, value in produced.items():
                parts.setdefault(key, []).append(value.detach().float().cpu())
            self.counts["clip_images"] += len(chunk)
        self.seconds["clip"] += time.perf_counter() - start
        return {key: torch.cat(values) for key, values in parts.items()}

    def _bank(self, references: list[Any], timestep: int, blocks: list[str]) -> dict[tuple[str, int], Any]:
        """The memory bank of one run's references at one timestep, for every state word, draw and block,
        built batch by batch as :meth:`MapDiff.fit` builds it."""
        import torch

        md = self.diffusion
        parts: dict[tuple[str, int], dict[str, list[Any]]] = {}
        step = md.default_batch_size
        for start in range(0, len(references), step):
            z0 = self._latents(references[start : start + step])
            captures = self._unet(z0, timestep, layers=[], blocks=blocks)
            for (word, draw), capture in captures.items():
                slot = parts.setdefault((word, draw), {})
                for name, entries in md.bank_entries(capture, blocks).items():
                    slot.setdefault(name, []).append(entries)
        return {
            key: {name: torch.cat(chunks) for name, chunks in slot.items()} for key, slot in parts.items()
        }

    # -- one category -----------------------------------------------------------------------------------
    def run_category(
        self,
        category: str,
        keys: list[RunKey],
        split: tuple[list[Any], list[Any]],
        todo: dict[int, set[RunKey]],
        stores: dict[int, ResultStore],
        *,
        kind: str,
        root: str | Path,
        progress: bool,
    ) -> None:
        import torch

        from clipfusion.data import object_name, sample_references
        from clipfusion.evaluation.protocol import ground_truth_masks
        from clipfusion.progress import progress_bar

        train, test = split
        md = self.diffusion
        self.object_name = object_name(category, self.config.object_names)
        prompts = {w: md.tokenize_prompt(self.object_name, w) for w in self.words}
        chunks = [test[i : i + self.batch_size] for i in range(0, len(test), self.batch_size)]
        keys = [key for key in keys if any(key in todo[p.index] for p in self.points)]
        references = {key: sample_references(list(train), key.shots, key.seed) for key in keys}
        masks = ground_truth_masks(test, self.config.output_size)
        labels = np.array([s.label for s in test], dtype=np.int64)
        started = time.perf_counter()
        clip_maps = {key: self._clip_components(references[key], chunks) for key in keys}
        timesteps = list(
            dict.fromkeys(p.timestep for p in self.points if any(k in todo[p.index] for k in keys))
        )
        bar = progress_bar(len(timesteps) * len(chunks), f"grid {category}", enabled=progress)
        try:
            for timestep in timesteps:
                points = [
                    p for p in self.points if p.timestep == timestep and any(k in todo[p.index] for k in keys)
                ]
                runs = [k for k in keys if any(k in todo[p.index] for p in points)]
                self.words_at = list(dict.fromkeys(w for p in points for w in p.config.diffusion.state_words))
                blocks = list(dict.fromkeys(b for p in points for b in p.config.diffusion.feature_blocks))
                layer_set = {name for p in points for name in self.layers[p.index]}
                layers = [name for name in self._all_layers() if name in layer_set]
                self.log(
                    f"{category}: timestep {timestep}: {len(points)} grid point(s) × {len(runs)} run(s), "
                    f"{len(test)} test images"
                )
                banks = {key: self._bank(references[key], timestep, blocks) for key in runs if key.shots > 0}
                maps: dict[tuple[int, RunKey], dict[str, list[Any]]] = {}
                for chunk in chunks:
                    z0 = self._latents(chunk)
                    captures = self._unet(z0, timestep, layers=layers, blocks=blocks)
                    start = time.perf_counter()
                    languages: dict[tuple[Any, ...], Any] = {}
                    for point in points:
                        words = point.config.diffusion.state_words
                        passes = [
                            (word, draw, captures[(word, draw)])
                            for draw in range(md.config.n_noise)
                            for word in words
                        ]
                        # diff_L depends on the words and layers only (not on the run or the feature block):
                        # once per batch for the points that share them; diff_V once per point and run
                        shared = (tuple(words), tuple(self.layers[point.index]))
                        if shared not in languages:
                            languages[shared] = md.maps_from_passes(
                                passes, prompts, layers=self.layers[point.index]
                            )[0]
                        language = languages[shared]
                        assert language is not None
                        for key in runs:
                            if key not in todo[point.index]:
                                continue
                            slot = maps.setdefault((point.index, key), {})
                            slot.setdefault("diff_L", []).append(language.float().cpu())
                            if key in banks:
                                _, visual = md.maps_from_passes(
                                    passes, None, banks[key], blocks=point.config.diffusion.feature_blocks
                                )
                                assert visual is not None
                                slot.setdefault("diff_V", []).append(visual.float().cpu())
                    self.seconds["maps"] += time.perf_counter() - start
                    del captures
                    bar.update(1)
                del banks
                model_s = round(time.perf_counter() - started, 3)
                for point in points:
                    for key in runs:
                        if key not in todo[point.index]:
                            continue
                        components = dict(clip_maps[key])
                        components.update({n: torch.cat(v) for n, v in maps.pop((point.index, key)).items()})
                        self._finish(
                            point,
                            key,
                            components,
                            references[key],
                            test,
                            labels,
                            masks,
                            stores,
                            kind=kind,
                            root=root,
                            model_s=model_s,
                        )
                        todo[point.index].discard(key)
        finally:
            bar.close()
            self.cache.clear()

    def _all_layers(self) -> list[str]:
        """Every captured layer of every point, in the UNet's execution order."""
        from clipfusion.branches.attention import cross_attention_layers

        blocks = list(dict.fromkeys(b for p in self.points for b in p.config.diffusion.attention_blocks))
        return cross_attention_layers(self.diffusion.unet, blocks)

    def _finish(
        self,
        point: GridPoint,
        key: RunKey,
        components: dict[str, Any],
        references: list[Any],
        test: list[Any],
        labels: np.ndarray,
        masks: np.ndarray | None,
        stores: dict[int, ResultStore],
        *,
        kind: str,
        root: str | Path,
        model_s: float,
    ) -> None:
        """Fuse one (point, run) as the detector does (batch by batch), score it, store it."""
        import torch

        from clipfusion.evaluation.protocol import run_metrics, run_row, save_maps_file
        from clipfusion.fusion import fuse_components

        fused, scores = [], []
        for start in range(0, len(test), self.batch_size):
            chunk = {name: value[start : start + self.batch_size] for name, value in components.items()}
            anomaly_map, score, _ = fuse_components(chunk, point.config)
            fused.append(anomaly_map)
            scores.append(score)
        maps = torch.cat(fused).numpy() if masks is not None else None
        score = torch.cat(scores).numpy().astype(np.float64)
        native = {n: v.numpy() for n, v in components.items() if n != "s_clip_L"}
        s_clip_L = components["s_clip_L"].numpy() if "s_clip_L" in components else None
        save_maps_file(
            point.folder,
            key,
            kind=kind,
            root=root,
            config=point.config,
            references=references,
            test=test,
            components=native,
            s_clip_L=s_clip_L,
            masks=masks,
        )
        metrics = run_metrics(labels, score, masks, maps)
        # the work is shared by every point and run of the category: no per-run time exists
        timings = {"shared_by_grid": True, "category_s_so_far": model_s}
        stores[point.index].add(
            run_row(key, metrics, references=references, test=test, root=root, timings=timings)
        )


# ---------------------------------------------------------------------------------------------------------
# the Table-5 view of a grid


def _table_axes(grid: Grid) -> tuple[str, str | None, list[str]]:
    keys = list(grid)
    if "diffusion.timestep" in grid and "diffusion.feature_blocks" in grid:
        row, col = "diffusion.timestep", "diffusion.feature_blocks"
    else:
        row, col = keys[0], (keys[1] if len(keys) > 1 else None)
    return row, col, [k for k in keys if k not in (row, col)]


def grid_table_markdown(
    points: list[GridPoint], runs: dict[str, list[dict[str, Any]]], grid: Grid, *, note: str = ""
) -> str:
    """Per shot count (and per value of any further option), rows = first option (timestep), columns =
    second (feature block), cells ``P-AUROC / PRO / I-AUROC`` in percent, mean over categories and seeds."""
    from clipfusion.evaluation.sweep import aggregate

    rows = _point_rows(points, runs)
    row_key, col_key, rest = _table_axes(grid)
    lines = ["# Grid over diffusion options", ""]
    if note:
        lines += [note, ""]
    lines += [
        "Cells: pixel AUROC / AUPRO / image AUROC in percent, mean over categories (and over seeds); each "
        "grid point is an ordinary run in its folder (results.csv, summary.md with ± over seeds, maps/ for "
        "`clipfusion sweep`).",
        "",
    ]
    categories = sorted({r["category"] for r in rows})
    if categories:
        lines += [f"Categories: {', '.join(categories)}.", ""]
    for shots in sorted({r["shots"] for r in rows}):
        table = aggregate(rows, shots)
        regime = "zero-shot" if shots == 0 else f"{shots}-shot"
        for fixed in grid_points({k: grid[k] for k in rest}):
            title = f"## {regime}" + (f" — {point_label(fixed)}" if fixed else "")
            cols = grid[col_key] if col_key else [None]
            head = [value_text(c) if c is not None else "" for c in cols]
            lines += [
                title,
                "",
                f"| {short_key(row_key)} \\ {short_key(col_key) if col_key else ''} | "
                + " | ".join(head)
                + " |",
                "|---|" + "---:|" * len(cols),
            ]
            for r in grid[row_key]:
                cells = []
                for c in cols:
                    values = {row_key: r, **({col_key: c} if col_key else {}), **fixed}
                    point = _find(points, values)
                    agg = table.get(point.index + 1) if point is not None else None
                    cells.append(_triple(agg))
                lines.append(f"| {value_text(r)} | " + " | ".join(cells) + " |")
            lines.append("")
    if not rows:
        lines.append("No finished run yet.")
    return "\n".join(lines)


def _point_rows(points: list[GridPoint], runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for point in points:
        for run in runs.get(point.folder.name, []):
            row = {"point": point.index + 1, **run}
            for column in METRIC_COLUMNS:
                if row.get(column) is None:
                    row[column] = math.nan
            rows.append(row)
    return rows


def _find(points: list[GridPoint], values: Point) -> GridPoint | None:
    for point in points:
        if all(point.values[k] == v for k, v in values.items()):
            return point
    return None


def _triple(agg: dict[str, tuple[float, float, int]] | None) -> str:
    if agg is None:
        return "–"
    parts = []
    for column in ("pixel_auroc", "pixel_aupro", "image_auroc"):
        mean = agg[column][0]
        parts.append("–" if math.isnan(mean) else f"{100 * mean:.1f}")
    return " / ".join(parts)


def write_grid_table(
    out_dir: Path,
    points: list[GridPoint],
    runs: dict[str, list[dict[str, Any]]],
    grid: Grid,
    *,
    note: str = "",
) -> list[Path]:
    """``table.md`` and, with matplotlib, ``table.png`` (one heat map per shot count and metric; one PNG per
    value of any option beyond the table's two)."""
    from clipfusion.evaluation import plots
    from clipfusion.evaluation.sweep import aggregate
    from clipfusion.outputs.files import atomic_write_text

    path = out_dir / "table.md"
    atomic_write_text(path, grid_table_markdown(points, runs, grid, note=note))
    written = [path]
    rows = _point_rows(points, runs)
    if not rows or not plots.available():
        return written
    row_key, col_key, rest = _table_axes(grid)
    cols = grid[col_key] if col_key else [None]
    for fixed in grid_points({k: grid[k] for k in rest}):
        panels = []
        for shots in sorted({r["shots"] for r in rows}):
            table = aggregate(rows, shots)
            regime = "zero-shot" if shots == 0 else f"{shots}-shot"
            panel = []
            for column, label in (
                ("pixel_auroc", "P-AUROC"),
                ("pixel_aupro", "PRO"),
                ("image_auroc", "I-AUROC"),
            ):
                values = []
                for r in grid[row_key]:
                    line = []
                    for c in cols:
                        point = _find(points, {row_key: r, **({col_key: c} if col_key else {}), **fixed})
                        agg = table.get(point.index + 1) if point is not None else None
                        line.append(100 * agg[column][0] if agg is not None else math.nan)
                    values.append(line)
                panel.append((f"{regime}: {label}", values))
            panels.append(panel)
        name = "table.png" if not fixed else f"table_{point_dirname(fixed)}.png"
        written.append(
            plots.heatmap_plot(
                out_dir / name,
                row_label=short_key(row_key),
                row_values=[value_text(v) for v in grid[row_key]],
                col_label=short_key(col_key) if col_key else "",
                col_values=[value_text(c) if c is not None else "" for c in cols],
                panels=panels,
                title="mean over categories and seeds (%)" + (f" — {point_label(fixed)}" if fixed else ""),
                note=note.strip("*"),
            )
        )
    return written


__all__ = [
    "DEFAULT_LATENT_MEMORY_MB",
    "GRID_FILE",
    "GridPoint",
    "GridResult",
    "LatentCache",
    "build_config",
    "evaluate_grid",
    "grid_table_markdown",
    "write_grid_table",
]
