"""CLIPFusion: the detector users touch. ``fit`` learns from an object name and k normal images,
``predict`` answers with a score, a fused anomaly map and the four component maps per image."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipfusion import fitted
from clipfusion.branches import Branch
from clipfusion.config import (
    CLIPFusionConfig,
    check_batch_size,
    load_config,
    load_preset,
    save_config,
    with_overrides,
)
from clipfusion.data.images import MIN_SIDE, ImageLike, open_image_like
from clipfusion.errors import ClipfusionError, ConfigError, InputError
from clipfusion.files import sha256_file
from clipfusion.fusion import MAP_NAMES, fuse_components
from clipfusion.progress import progress_bar
from clipfusion.runtime import (
    dtype_name,
    free_device_memory,
    map_large_blocks,
    resolve_placement,
    return_freed_memory,
)
from clipfusion.shared import SharedModels, load_branches, models_difference
from clipfusion.thresholds import Thresholds, pixel_mask

log = logging.getLogger(__name__)
# what fit and predict take: paths or PIL images, or a float (N, 3, H, W) tensor batch in [0, 1]
Images = Sequence[ImageLike] | ImageLike | torch.Tensor


@dataclass
class AnomalyResult:
    """One image's answer. ``maps`` holds ``clip_L``, ``clip_V``, ``diff_L``, ``diff_V`` after smoothing,
    at the output size; in zero-shot mode the two visual maps are zero, as in the paper's fusion.

    ``native_maps`` are the component maps as the branches computed them, before the resize and the
    smoothing (each on its own grid: 15×15 CLIP tokens, the diffusion attention/feature grid; only those
    computed), and ``s_clip_L`` the global CLIP probability: what ``evaluate --save-maps`` stores so that the
    fusion can be redone exactly.
    """

    score: float
    anomaly_map: np.ndarray
    maps: dict[str, np.ndarray]
    image_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    native_maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    s_clip_L: float | None = None

    def mask(self, threshold: float) -> np.ndarray:
        """Binary anomaly mask: pixels whose fused value exceeds ``threshold`` (same scale as the map)."""
        return pixel_mask(self.anomaly_map, threshold)


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    """A float ``(N, 3, H, W)`` batch in [0, 1] (one ``(3, H, W)`` image becomes a batch of one).

    Values a hair outside [0, 1] (a bicubic resize's overshoot) are clipped, as PIL clips; values far
    outside mean the tensor is not pixels in [0, 1] (mean/std-normalised, or 0..255), which would give
    silently wrong maps, so they are refused.
    """
    batch = images.unsqueeze(0) if images.ndim == 3 else images
    if batch.ndim != 4 or batch.shape[1] != 3 or not batch.is_floating_point():
        raise InputError(
            f"<tensor {tuple(images.shape)} {images.dtype}>: expected a float (N, 3, H, W) tensor of RGB "
            "pixels in [0, 1]"
        )
    if min(batch.shape[-2:]) < MIN_SIDE:
        raise InputError(f"<tensor {tuple(images.shape)}>: image too small (at least {MIN_SIDE} px a side)")
    if batch.numel():
        low, high = (float(v) for v in torch.aminmax(batch.detach()))
        if not (math.isfinite(low) and math.isfinite(high)) or low < -0.25 or high > 1.25:
            raise InputError(
                f"<tensor {tuple(images.shape)}>: pixel values span [{low:.3g}, {high:.3g}], expected [0, 1] "
                "(clipfusion normalises images itself: pass unnormalised RGB in [0, 1])"
            )
        if low < 0 or high > 1:
            batch = batch.clamp(0.0, 1.0)
    return batch


class CLIPFusion:
    """The fused detector. Either branch can be injected (tests, benchmarks, other weights: anything that
    implements :class:`~clipfusion.branches.Branch`); otherwise each is built from its section of the
    configuration, with the weights found in ``weights_dir`` when one is given (a folder made by
    ``clipfusion weights fetch``), else in the Hugging Face cache.

    ``config.use_clip`` / ``config.use_diffusion`` switch a branch off entirely (ablations, or CLIP-only runs
    on small machines); a switched-off branch contributes zero maps. ``local_files_only`` keeps the hub out of
    loading (default: the hub library's own ``HF_HUB_OFFLINE`` setting; a weights folder never needs it).
    ``text_encoders=False`` builds the branches without their text encoders (MapDiff never loads its;
    PatchCLIP drops its text tower once loaded): for a detector whose prompt features come from a saved fit
    (:meth:`load`), which can then not be fitted for new object names.

    ``objects`` names the objects the detector will be fitted for, when they are known before it loads
    (a command line, an evaluation's categories): their prompt features are computed as each text encoder
    loads, and the text encoders are freed before the image models load, so the two never share memory (for
    the paper models in float32 the peak of a run drops by ≈ 1.7 GB, to about the peak of inference alone).
    The detector is then as after :meth:`prepare` and :meth:`release_text_encoders`: it can be fitted for
    those names only.

    ``models`` (:class:`~clipfusion.shared.SharedModels`): the branches are views of networks shared with
    other fitted objects (one copy of the models for a whole production line); nothing is loaded here.
    """

    def __init__(
        self,
        config: CLIPFusionConfig | None = None,
        clip: Branch | None = None,
        diffusion: Branch | None = None,
        *,
        weights_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        text_encoders: bool = True,
        objects: Iterable[str] | None = None,
        models: SharedModels | None = None,
    ) -> None:
        from clipfusion.data import object_name as to_object_name

        self.config = config or load_preset("paper")
        self.weights_dir = Path(weights_dir).expanduser() if weights_dir is not None else None
        names = list(dict.fromkeys(to_object_name(raw, self.config.object_names) for raw in objects or ()))
        if names and not text_encoders:
            raise ConfigError("objects need the text encoders: their prompts are encoded while loading")
        for given, name in ((clip, "clip"), (diffusion, "diffusion")):
            if given is not None and not isinstance(given, Branch):
                raise ConfigError(f"the {name} branch given does not implement clipfusion.branches.Branch")
        if models is not None:
            if clip is not None or diffusion is not None or weights_dir is not None:
                raise ConfigError("give either models or branches (or a weights folder), not both")
            clip, diffusion = models.branches(self.config)
        elif (clip is None and self.config.use_clip) or (diffusion is None and self.config.use_diffusion):
            # before any weights exist: they, and the text encoders freed later, must not leave the heap
            # full of holes that the activations then fill and keep resident (runtime.map_large_blocks)
            map_large_blocks()
            clip, diffusion = load_branches(
                self.config,
                weights_dir=self.weights_dir,
                local_files_only=local_files_only,
                text_encoders=text_encoders,
                objects=names,
                clip=clip,
                diffusion=diffusion,
            )
            # the float32 copies left by a reduced-precision cast go back to the system, not just the heap
            return_freed_memory()
        #: the models this detector's branches are views of, when they are shared with other fitted objects
        self.models = models
        if models is not None:
            self.weights_dir = models.weights_dir
        self.clip: Branch | None = clip if self.config.use_clip else None
        self.diffusion: Branch | None = diffusion if self.config.use_diffusion else None
        self.branches: list[Branch] = [b for b in (self.clip, self.diffusion) if b is not None]
        if names:  # branches given ready-made have not seen the names yet (the loaded ones are released)
            self.prepare(names).release_text_encoders()
        self.object_name: str | None = None
        self.references: list[str] = []
        #: sha256 of each reference file (None for an in-memory image), recorded by :meth:`save`
        self.reference_sha256: list[str | None] = []
        #: decision thresholds that travel with the fit (:meth:`save` writes them, :meth:`load` reads them)
        self.thresholds: Thresholds | None = None
        self.timings: dict[str, float] = {}

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_preset(
        cls,
        name: str = "paper",
        *,
        weights_dir: str | Path | None = None,
        objects: Iterable[str] | None = None,
        **overrides: Any,
    ) -> CLIPFusion:
        """A preset (``paper``, ``tiny``, ``random-full``) with keyword overrides of any option; branch
        options use double underscores or dots: ``from_preset("tiny", clip__patch_mode="crops")``.
        ``objects``: as for the constructor."""
        config = load_preset(name)
        if overrides:
            config = with_overrides(config, {k.replace("__", "."): v for k, v in overrides.items()})
        return cls(config, weights_dir=weights_dir, objects=objects)

    @classmethod
    def from_config_file(cls, path: str | Path, *, weights_dir: str | Path | None = None) -> CLIPFusion:
        return cls(load_config(path), weights_dir=weights_dir)

    def save_config(self, path: str | Path) -> Path:
        """The configuration, with what ``"auto"`` resolved to here as its ``resolved`` record."""
        return save_config(self.config, path, resolved=self.resolved)

    @property
    def resolved(self) -> dict[str, Any]:
        """Where each branch runs and in which dtype, ``"auto"`` resolved (``{"clip": {"device": "cpu",
        "dtype": "float32"}, "diffusion": {...}, "auto_dtype": "<the rule's reason>"}``): the record a run
        keeps beside the configuration. Taken from the branches themselves where they say (an injected
        branch may run elsewhere than the configuration says)."""
        record = resolve_placement(self.config)
        for branch in self.branches:
            device, dtype = getattr(branch, "device", None), getattr(branch, "dtype", None)
            if isinstance(device, torch.device) and isinstance(dtype, torch.dtype):
                record[branch.name] = {"device": str(device), "dtype": dtype_name(dtype)}
        return record

    # -- a fitted detector on disk (the folder's format: clipfusion.fitted) ----------------------------------
    def save(self, directory: str | Path, thresholds: Thresholds | None = None) -> Path:
        """Save the fit to a folder (configuration, object name, text and prompt embeddings, memory banks,
        reference names and sha256, ``thresholds`` or else :attr:`thresholds`, software versions, and a
        fingerprint of the model weights; not the weights themselves). Layout: :mod:`clipfusion.fitted`."""
        if self.object_name is None:
            raise ClipfusionError("save: fit the detector first (fit(object_name, references))")
        branches = {
            branch.name: fitted.FittedBranch(
                branch.state(),
                branch.weights_fingerprint(),
                fitted.weights_source(self.config, self.weights_dir, branch.name),
            )
            for branch in self.branches
        }
        return fitted.write(
            directory,
            config=self.config,
            object_name=self.object_name,
            references=list(zip(self.references, self.reference_sha256, strict=True)),
            branches=branches,
            thresholds=thresholds if thresholds is not None else self.thresholds,
        )

    @classmethod
    def load(
        cls,
        directory: str | Path,
        weights_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        *,
        device: str | None = None,
        clip: Branch | None = None,
        diffusion: Branch | None = None,
        models: SharedModels | None = None,
    ) -> CLIPFusion:
        """A saved fit, ready to :meth:`predict` exactly as the saved detector did, with its
        :attr:`thresholds`. The model weights come from ``weights_dir`` or the cache, as for the
        constructor, and must be the ones the fit used (else a :class:`~clipfusion.errors.ConfigError`
        naming what differs); the text encoders are not loaded. ``device`` overrides where it runs.

        ``models``: load the fit onto shared models instead (no network is loaded; their weights must be
        the fit's, checked the same way), e.g. several fitted folders onto one set of models."""
        record = fitted.read(directory)
        config = record.config if device is None else record.config.replace(device=device)
        folder = Path(weights_dir).expanduser() if weights_dir is not None else None
        if models is not None:
            folder = models.weights_dir if folder is None else folder
            difference = models_difference(models.config, config)
            if difference is not None:
                raise ConfigError(f"{record.path}: needs other models than the shared ones ({difference})")
        for name, used in (("clip", config.use_clip), ("diffusion", config.use_diffusion)):
            if used:
                record.check_weights_folder(name, folder)
        detector = cls(
            config,
            clip=clip,
            diffusion=diffusion,
            weights_dir=folder if models is None else None,
            local_files_only=local_files_only,
            text_encoders=False,
            models=models,
        )
        detector.weights_dir = folder
        for branch in detector.branches:
            record.check_fingerprint(branch.name, branch.weights_fingerprint(), detector.config, folder)
            state = record.branch_state(branch.name)
            try:
                branch.load_state(state)
            except ClipfusionError as exc:
                raise InputError(f"{record.branch_path(branch.name)}: {exc}") from exc
        detector.release_text_encoders()  # none was loaded; the prompts are final (precompute_conditioning)
        detector.object_name = record.object_name
        detector.references = record.reference_names
        detector.reference_sha256 = [ref.get("sha256") for ref in record.references]
        detector.thresholds = record.thresholds
        return detector

    # -- fit / predict ------------------------------------------------------------------------------------
    @property
    def shots(self) -> int:
        return len(self.references)

    @property
    def default_batch_size(self) -> int:
        """Images per forward pass when a call does not say: the smallest of the branches' own."""
        return min(b.default_batch_size for b in self.branches)

    def fit(
        self, object_name: str, references: Iterable[ImageLike] | torch.Tensor | None = None
    ) -> CLIPFusion:
        """Prepare for one product: prompts for ``object_name``; memory banks from ``references`` (normal
        images: paths, PIL images or a float ``(N, 3, H, W)`` tensor in [0, 1]; empty or None → zero-shot)."""
        from clipfusion.data import object_name as to_object_name

        name = to_object_name(object_name, self.config.object_names)
        if isinstance(references, torch.Tensor):
            images: list[Image.Image] | torch.Tensor = _as_batch(references)
            paths: list[str | None] = [None] * len(images)
        else:
            loaded = [open_image_like(r) for r in (references or [])]
            images, paths = [img for img, _ in loaded], [path for _, path in loaded]
        start = time.perf_counter()
        for branch in self.branches:
            branch.fit(name, images)
        self.timings["fit"] = time.perf_counter() - start
        log.debug("fitted to %r with %d references in %.1f s", name, len(images), self.timings["fit"])
        self.object_name = name
        self.references = [path or f"<image {i}>" for i, path in enumerate(paths)]
        self.reference_sha256 = [sha256_file(Path(path)) if path else None for path in paths]
        self.thresholds = None  # thresholds belong to a fit
        return self

    def prepare(self, object_names: Iterable[str]) -> CLIPFusion:
        """Compute and cache the prompt features of every object name, e.g. before
        :meth:`release_text_encoders` in a run over several categories."""
        from clipfusion.data import object_name as to_object_name

        names = [to_object_name(raw, self.config.object_names) for raw in object_names]
        for branch in self.branches:
            branch.prepare(names)
        return self

    def release_text_encoders(self) -> CLIPFusion:
        """Free both text encoders (≈ 1.8 GB in float32 for the paper models) once every object name that
        will be used has been fitted or prepared; scoring images needs only the image towers."""
        for branch in self.branches:
            branch.release_text_encoder()
        return_freed_memory()
        return self

    def predict(
        self, images: Images, batch_size: int | None = None, progress: bool = False
    ) -> list[AnomalyResult]:
        """Score images (paths, PIL images, or a float ``(N, 3, H, W)`` tensor of RGB pixels in [0, 1], e.g.
        a batch from a data loader), ``batch_size`` per forward pass (default: the branches' own).

        Out of memory on a batch, the batch is halved and retried (down to one image), so a batch size
        that is too large for the device costs time, not the run; at one image it is a clear error.
        """
        if self.object_name is None:
            raise RuntimeError("call fit(object_name, references) before predict")
        if isinstance(images, str | Path | Image.Image):
            images = [images]
        elif isinstance(images, torch.Tensor):
            images = _as_batch(images)
        batch_size = check_batch_size(batch_size) or self.default_batch_size
        results: list[AnomalyResult] = []
        bar = progress_bar(len(images), "predict", enabled=progress)
        config_dict = self.config.to_dict()
        start = 0
        while start < len(images):
            if isinstance(images, torch.Tensor):
                pixels: list[Image.Image] | torch.Tensor = images[start : start + batch_size]
                chunk = [(None, None)] * len(pixels)
            else:
                chunk = [open_image_like(item) for item in images[start : start + batch_size]]
                pixels = [img for img, _ in chunk]
            try:
                components = self.predict_components(pixels, batch_size=batch_size)
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
            outputs = self.fuse(components)
            for i, (_, path) in enumerate(chunk):
                results.append(
                    AnomalyResult(
                        score=float(outputs["score"][i]),
                        anomaly_map=outputs["anomaly_map"][i].numpy().astype(np.float32, copy=False),
                        maps={k: outputs[k][i].numpy().astype(np.float32, copy=False) for k in MAP_NAMES},
                        image_path=path,
                        config=config_dict,
                        native_maps={
                            k: components[k][i].numpy().astype(np.float32, copy=False)
                            for k in MAP_NAMES
                            if k in components
                        },
                        s_clip_L=float(components["s_clip_L"][i]) if "s_clip_L" in components else None,
                    )
                )
            start += len(chunk)
            bar.update(len(chunk))
        bar.close()
        return results

    def predict_components(
        self, images: Sequence[Image.Image] | torch.Tensor, *, batch_size: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The branches' outputs for a list of images (or a float batch), before the fusion: float32 CPU
        tensors, each map on its branch's own grid (``native=True``), and ``s_clip_L``."""
        outputs: dict[str, torch.Tensor] = {}
        for branch in self.branches:
            start = time.perf_counter()
            produced = branch.predict(images, batch_size=batch_size, native=True)
            outputs.update({k: v.detach().float().cpu() for k, v in produced.items()})
            self.timings[branch.name] = self.timings.get(branch.name, 0.0) + time.perf_counter() - start
        return outputs

    def fuse(self, components: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The configured fusion (:func:`clipfusion.fusion.fuse_components`) of :meth:`predict_components`'
        output: ``score``, ``anomaly_map``, the four smoothed maps (zero where not computed or not among
        the ``terms``) and ``s_clip_L``."""
        cfg = self.config
        start = time.perf_counter()
        anomaly_map, score, smoothed = fuse_components(components, cfg)
        self.timings["fusion"] = self.timings.get("fusion", 0.0) + time.perf_counter() - start
        n = anomaly_map.shape[0]
        zeros = torch.zeros(n, cfg.output_size, cfg.output_size)
        result = {name: smoothed.get(name, zeros) for name in MAP_NAMES}
        result.update(anomaly_map=anomaly_map, score=score)
        if "s_clip_L" in components:
            result["s_clip_L"] = components["s_clip_L"]
        return result


__all__ = ["AnomalyResult", "CLIPFusion", "ImageLike", "Images"]
