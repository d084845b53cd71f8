"""CLIPFusion: the detector users touch. ``fit`` learns from an object name and k normal images,
``predict`` answers with a score, a fused anomaly map and the four component maps per image."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipfusion.config import CLIPFusionConfig, load_config, load_preset, save_config, with_overrides
from clipfusion.errors import ClipfusionError, ConfigError, InputError
from clipfusion.fusion import MAP_NAMES, SCORE_MODES, fuse
from clipfusion.runtime import free_device_memory, return_freed_memory

ImageLike = str | Path | Image.Image


@dataclass
class AnomalyResult:
    """One image's answer. ``maps`` holds ``clip_L``, ``clip_V``, ``diff_L``, ``diff_V`` after smoothing,
    at the output size; in zero-shot mode the two visual maps are zero, as in the paper's fusion."""

    score: float
    anomaly_map: np.ndarray
    maps: dict[str, np.ndarray]
    image_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    def mask(self, threshold: float) -> np.ndarray:
        """Binary anomaly mask: pixels whose fused value exceeds ``threshold`` (same scale as the map)."""
        return self.anomaly_map > threshold


def _as_image(item: ImageLike) -> tuple[Image.Image, str | None]:
    from clipfusion.data.images import MIN_SIDE, load_image

    if isinstance(item, Image.Image):
        if min(item.size) < MIN_SIDE:
            width, height = item.size
            raise InputError(f"<PIL image {width}×{height}>: image too small (at least {MIN_SIDE} px a side)")
        return item.convert("RGB"), None
    return load_image(item, min_side=MIN_SIDE), str(item)


class CLIPFusion:
    """The fused detector. Either branch can be injected (tests, benchmarks, other weights); otherwise each
    is built from its section of the configuration.

    ``config.use_clip`` / ``config.use_diffusion`` switch a branch off entirely (ablations, or CLIP-only runs
    on small machines); a switched-off branch contributes zero maps.
    """

    def __init__(
        self,
        config: CLIPFusionConfig | None = None,
        clip: Any | None = None,
        diffusion: Any | None = None,
    ) -> None:
        self.config = config or load_preset("paper")
        validate_config(self.config)
        self.clip = clip
        self.diffusion = diffusion
        if (self.clip is None and self.config.use_clip) or (
            self.diffusion is None and self.config.use_diffusion
        ):
            from clipfusion.models.weights import apply_weights_dir

            # a weights folder ($CLIPFUSION_WEIGHTS / --weights) replaces hub ids by local paths for loading
            # only; self.config keeps the portable names that results record
            local = apply_weights_dir(self.config)
            if self.clip is None and self.config.use_clip:
                from clipfusion.branches.patchclip import PatchCLIP

                self.clip = PatchCLIP.from_config(local.clip)
            if self.diffusion is None and self.config.use_diffusion:
                from clipfusion.branches.mapdiff import MapDiff

                self.diffusion = MapDiff.from_config(local.diffusion)
            # the float32 copies left by a reduced-precision cast go back to the system, not just the heap
            return_freed_memory()
        self.object_name: str | None = None
        self.references: list[str] = []
        self.timings: dict[str, float] = {}

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "paper", **overrides: Any) -> CLIPFusion:
        """A preset (``paper``, ``tiny``, ``random-full``) with keyword overrides of any option; branch
        options use double underscores or dots: ``from_preset("tiny", clip__patch_mode="crops")``."""
        config = load_preset(name)
        if overrides:
            config = with_overrides(config, {k.replace("__", "."): v for k, v in overrides.items()})
        return cls(config)

    @classmethod
    def from_config_file(cls, path: str | Path) -> CLIPFusion:
        return cls(load_config(path))

    def save_config(self, path: str | Path) -> Path:
        return save_config(self.config, path)

    # -- fit / predict ------------------------------------------------------------------------------------
    @property
    def shots(self) -> int:
        return len(self.references)

    def fit(self, object_name: str, references: Iterable[ImageLike] | None = None) -> CLIPFusion:
        """Prepare for one product: prompts for ``object_name``; memory banks from ``references`` (normal
        images; empty or None → zero-shot)."""
        from clipfusion.data import object_name as to_object_name

        name = to_object_name(object_name, self.config.object_names)
        loaded = [_as_image(r) for r in (references or [])]
        images = [img for img, _ in loaded]
        start = time.perf_counter()
        for branch in self._branches():
            branch.fit(name, images)
        self.timings["fit"] = time.perf_counter() - start
        self.object_name = name
        self.references = [path or f"<image {i}>" for i, (_, path) in enumerate(loaded)]
        return self

    def prepare(self, object_names: Iterable[str]) -> CLIPFusion:
        """Compute and cache the prompt features of every object name, e.g. before
        :meth:`release_text_encoders` in a run over several categories."""
        from clipfusion.data import object_name as to_object_name

        for raw in object_names:
            name = to_object_name(raw, self.config.object_names)
            if hasattr(self.clip, "text_features"):
                self.clip.text_features(name)
            if hasattr(self.diffusion, "prompt_embeddings"):
                for state in self.diffusion.config.state_words:
                    self.diffusion.prompt_embeddings(name, state)
        return self

    def release_text_encoders(self) -> CLIPFusion:
        """Free both text encoders (≈ 1.8 GB in float32 for the paper models) once every object name that
        will be used has been fitted or prepared; scoring images needs only the image towers."""
        if hasattr(self.clip, "release_text_tower"):
            self.clip.release_text_tower()
        if hasattr(self.diffusion, "release_text_encoder"):
            self.diffusion.release_text_encoder()
        return_freed_memory()
        return self

    def predict(
        self, images: Sequence[ImageLike] | ImageLike, batch_size: int | None = None, progress: bool = False
    ) -> list[AnomalyResult]:
        """Score images (paths or PIL images), ``batch_size`` at a time (default: the branches' own).

        Out of memory on a batch, the batch is halved and retried (down to one image), so a batch size
        that is too large for the device costs time, not the run; at one image it is a clear error.
        """
        if self.object_name is None:
            raise RuntimeError("call fit(object_name, references) before predict")
        if isinstance(images, str | Path | Image.Image):
            images = [images]
        batch_size = batch_size or max(1, min(self._branch_batch_sizes()))
        results: list[AnomalyResult] = []
        bar = _progress(len(images), "predict", progress)
        config_dict = self.config.to_dict()
        start = 0
        while start < len(images):
            chunk = [_as_image(item) for item in images[start : start + batch_size]]
            try:
                with self._branch_batch_size(batch_size):
                    outputs = self.predict_tensors([img for img, _ in chunk])
            except torch.OutOfMemoryError as exc:
                free_device_memory()
                if batch_size == 1:
                    raise ClipfusionError(
                        "out of memory with one image per batch; use a smaller output_size, --dtype bfloat16 "
                        "(float16 on CUDA) or a device with more memory"
                    ) from exc
                batch_size = max(1, batch_size // 2)
                warnings.warn(f"out of memory; retrying with batch size {batch_size}", stacklevel=2)
                continue
            for i, (_, path) in enumerate(chunk):
                results.append(
                    AnomalyResult(
                        score=float(outputs["score"][i]),
                        anomaly_map=outputs["anomaly_map"][i].numpy().astype(np.float32, copy=False),
                        maps={k: outputs[k][i].numpy().astype(np.float32, copy=False) for k in MAP_NAMES},
                        image_path=path,
                        config=config_dict,
                    )
                )
            start += len(chunk)
            bar.update(len(chunk))
        bar.close()
        return results

    @contextlib.contextmanager
    def _branch_batch_size(self, batch_size: int, *, exact: bool = False) -> Iterator[None]:
        """The branches split their input by their own batch size; cap it at the detector's for one call
        (``exact``: also raise it, so that a benchmark's batch goes through the branches in one piece)."""
        saved = []
        for branch in self._branches():
            config = getattr(branch, "config", None)
            current = getattr(config, "batch_size", None)
            if (
                dataclasses.is_dataclass(config)
                and current is not None
                and (current > batch_size or (exact and current != batch_size))
            ):
                saved.append((branch, config))
                branch.config = dataclasses.replace(config, batch_size=batch_size)
        try:
            yield
        finally:
            for branch, config in saved:
                branch.config = config

    def predict_tensors(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """One batch through both branches and the fusion; tensors on the CPU, float32."""
        cfg = self.config
        outputs: dict[str, torch.Tensor] = {}
        for branch in self._branches():
            start = time.perf_counter()
            outputs.update({k: v.detach().float().cpu() for k, v in branch.predict(images).items()})
            key = "clip" if branch is self.clip else "diffusion"
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        anomaly_map, score, smoothed = fuse(
            {k: outputs.get(k) for k in MAP_NAMES},
            outputs.get("s_clip_L"),
            alpha_map=cfg.alpha_map,
            alpha_score=cfg.alpha_score,
            sigma=cfg.sigma,
            output_size=cfg.output_size,
            score_mode=cfg.score_mode,
        )
        self.timings["fusion"] = self.timings.get("fusion", 0.0) + time.perf_counter() - start
        n = anomaly_map.shape[0]
        zeros = torch.zeros(n, cfg.output_size, cfg.output_size)
        result = {name: smoothed.get(name, zeros) for name in MAP_NAMES}
        result.update(anomaly_map=anomaly_map, score=score)
        if "s_clip_L" in outputs:
            result["s_clip_L"] = outputs["s_clip_L"]
        return result

    # -- helpers ------------------------------------------------------------------------------------------
    def _branches(self) -> list[Any]:
        return [b for b in (self.clip, self.diffusion) if b is not None]

    def _branch_batch_sizes(self) -> list[int]:
        sizes = [b.config.batch_size for b in self._branches() if hasattr(b, "config")]
        return sizes or [8]


def validate_config(config: CLIPFusionConfig) -> None:
    """Refuse values that would silently give wrong maps, before any model is loaded."""
    problems = []
    for name in ("alpha_map", "alpha_score"):
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name} must lie in [0, 1], got {value}")
    if config.sigma < 0:
        problems.append(f"sigma must be >= 0, got {config.sigma}")
    if config.output_size < 8:
        problems.append(f"output_size must be at least 8, got {config.output_size}")
    if config.score_mode not in SCORE_MODES:
        problems.append(f"score_mode must be one of {', '.join(SCORE_MODES)}, got {config.score_mode!r}")
    if not (config.use_clip or config.use_diffusion):
        problems.append("use_clip and use_diffusion are both false: nothing would be computed")
    if problems:
        raise ConfigError("; ".join(problems))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False)


__all__ = ["AnomalyResult", "CLIPFusion"]
