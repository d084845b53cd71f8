"""The models and the shared work of one grid evaluation: VAE latents cached across the grid, one UNet pass
per batch, state word and noise draw serving every point at its timestep (through :meth:`MapDiff.passes`,
the branch's own loop), memory banks built by :meth:`MapDiff.bank_from_passes`, each point's maps read from
the shared passes by :meth:`MapDiff.maps_from_passes`, and each (point, run) fused, scored and stored."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipfusion.config import CLIPFusionConfig, check_batch_size
from clipfusion.errors import ConfigError
from clipfusion.evaluation.grid.points import GridPoint, build_config
from clipfusion.evaluation.results import ResultStore, RunKey


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


class GridEngine:
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
        from clipfusion.branches.mapdiff import MapDiff
        from clipfusion.branches.mapdiff.attention import cross_attention_layers

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
        self.batch_size = check_batch_size(batch_size) or detector.default_batch_size
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
        from clipfusion.data.images import open_image_like

        return [open_image_like(s.image_path)[0] for s in samples]

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
        start = time.perf_counter()
        passes = self.diffusion.passes(
            z0,
            object_name=self.object_name,
            state_words=self.words_at,
            attention_layers=layers,
            feature_blocks=blocks,
            timestep=timestep,
        )
        captures = {(word, draw): capture for word, draw, capture in passes}
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
        built batch by batch as :meth:`MapDiff.fit` builds it (:meth:`MapDiff.bank_from_passes`)."""
        md = self.diffusion
        step = md.default_batch_size

        def passes() -> Iterator[tuple[str, int, Any]]:
            for start in range(0, len(references), step):
                z0 = self._latents(references[start : start + step])
                for (word, draw), capture in self._unet(z0, timestep, layers=[], blocks=blocks).items():
                    yield word, draw, capture

        return md.bank_from_passes(passes(), blocks)

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
        from clipfusion.branches.mapdiff.attention import cross_attention_layers

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


__all__ = ["GridEngine", "LatentCache"]
