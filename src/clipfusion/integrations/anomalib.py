"""CLIPFusion inside anomalib: an ``AnomalibModule`` that anomalib's ``Engine``, data modules, metrics and
visualiser run like any of their own models.

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from clipfusion.integrations.anomalib import ClipFusion

    model = ClipFusion(preset="paper", shots=2, seed=0, weights_dir="/data/clipfusion-weights")
    Engine(accelerator="cpu").test(model, datamodule=MVTecAD(root="/data/mvtec_ad", category="bottle"))

Training-free like anomalib's WinCLIP: ``fit`` only runs the validation pass that anomalib's post-processor
learns its thresholds and normalisation from, no optimiser, no trainer arguments. What differs from WinCLIP,
on purpose:

- the k references are drawn exactly as ``clipfusion evaluate`` draws them (the train split sorted by path,
  :func:`clipfusion.data.sample_references` with the seed), or given as files, and logged — never "the first k
  of a shuffled loader" — so a run here and a run of ``clipfusion evaluate`` use the same memory bank;
- the object name is the data module's category through :func:`clipfusion.data.object_name`
  (``metal_nut`` → "metal nut", ``pcb1`` → "printed circuit board") unless ``class_name`` says otherwise;
- the pre-processor only resizes to a working size (512 by default): the branches resize and normalise for
  their own models (240 px bicubic + CLIP statistics, 512 px bilinear for SD-2) from the ``[0, 1]`` tensors
  anomalib hands over;
- :class:`ClipFusionPostProcessor` maps scores to [0, 1] without changing their order on the validation
  data, so anomalib's AUROC, AP and PRO equal those of the raw scores (anomalib's default clips, which ties
  scores and moves the AUROC);
- the validation pass that anomalib runs before ``test`` and ``predict`` is remembered image by image (path
  and pixel content), so the test pass over the same images does not compute them a second time.

Where CLIPFusion runs is its own ``device`` option (``auto``: CUDA when present), whatever the trainer's
accelerator; anomalib's tensors are moved there and the answers moved back.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    import anomalib
    from anomalib import LearningType
    from anomalib.data import Batch, InferenceBatch
    from anomalib.metrics import Evaluator
    from anomalib.models.components import AnomalibModule, DynamicBufferMixin
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
    from anomalib.visualization import Visualizer
    from torchvision.transforms.v2 import InterpolationMode, Resize
    from torchvision.transforms.v2.functional import to_dtype, to_image
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without anomalib
    raise ImportError(
        f"clipfusion.integrations.anomalib needs anomalib 2.7: pip install 'clipfusion[anomalib]' ({exc})"
    ) from exc

from clipfusion.config import check_batch_size, load_config, with_overrides
from clipfusion.data import Sample, collect_images, load_image, sample_references
from clipfusion.data.images import MIN_SIDE
from clipfusion.detector import CLIPFusion
from clipfusion.errors import ConfigError, InputError, InputErrors
from clipfusion.maps import resize_maps
from clipfusion.provenance import random_weights_banner

logger = logging.getLogger(__name__)

#: the anomalib versions this adapter was tested with (the ``anomalib`` extra pins them)
TESTED_ANOMALIB = ((2, 7),)


def _check_anomalib_version() -> None:
    parts = str(anomalib.__version__).split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        major_minor = (-1, -1)
    if major_minor not in TESTED_ANOMALIB:
        tested = ", ".join(f"{a}.{b}" for a, b in TESTED_ANOMALIB)
        warnings.warn(
            f"clipfusion.integrations.anomalib was tested with anomalib {tested}; "
            f"found {anomalib.__version__}",
            stacklevel=3,
        )


_check_anomalib_version()


# -- pre- and post-processing ------------------------------------------------------------------------------


def working_size_pre_processor(working_size: int | tuple[int, int] | None = 512) -> PreProcessor:
    """anomalib's :class:`PreProcessor` doing only what the branches cannot undo: bring every image (and
    its mask) to one working size, so that a batch stacks and metrics and pictures have a known
    resolution. ``None`` keeps the images' own size (they must then share one per batch).

    No normalisation: each branch standardises for its own model. Bilinear with antialiasing is the filter
    the diffusion branch uses itself, so at the default 512 px the paper's SD-2 input is unchanged; masks
    are resized nearest (torchvision does that for masks whatever the filter).
    """
    if working_size is None:
        return PreProcessor(transform=None)
    if isinstance(working_size, bool) or not isinstance(working_size, int | tuple | list):
        raise ConfigError(
            f"working_size must be a positive integer, (height, width) or None; got {working_size!r}"
        )
    size = (working_size, working_size) if isinstance(working_size, int) else tuple(working_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < MIN_SIDE for s in size):
        raise ConfigError(f"working_size must be at least {MIN_SIDE} px a side; got {working_size!r}")
    return PreProcessor(transform=Resize(size, interpolation=InterpolationMode.BILINEAR, antialias=True))


class ClipFusionPostProcessor(PostProcessor):
    """anomalib's post-processor with an order-preserving normalisation, for zero- and few-shot models.

    Thresholds are anomalib's (F1-adaptive on the validation pass, ``image_sensitivity`` /
    ``pixel_sensitivity``), as for WinCLIP. The normalisation differs: anomalib's default shifts by the
    threshold, divides by ``max - min`` and clips to [0, 1], which ties every score more than half a range
    above the threshold (and below it) and so changes the AUROC it then reports. Here the validation
    minimum goes to 0, the threshold to 0.5 and the maximum to 1, linearly in between, so no two scores of
    the validation data change order, the decision stays ``> 0.5``, and anomalib's AUROC, AP and PRO are
    those of the raw scores. Only scores outside the validation range are clipped.

    ``enable_threshold_matching`` is off by default: CLIPFusion's image score (Eq. 9) and its map values are
    different sums, so one cannot stand in for the other's threshold.
    """

    def __init__(self, *, enable_threshold_matching: bool = False, **kwargs: Any) -> None:
        super().__init__(enable_threshold_matching=enable_threshold_matching, **kwargs)

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None,
        norm_min: torch.Tensor,
        norm_max: torch.Tensor,
        threshold: torch.Tensor,
    ) -> torch.Tensor | None:
        if preds is None:
            return preds
        threshold = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
        below = (threshold - norm_min).clamp_min(0)
        above = (norm_max - threshold).clamp_min(0)
        below = torch.where(below > 0, below, torch.ones_like(below))
        above = torch.where(above > 0, above, torch.ones_like(above))
        lower = 0.5 - 0.5 * (threshold - preds) / below  # [min, threshold] → [0, 0.5]
        upper = 0.5 + 0.5 * (preds - threshold) / above  # [threshold, max] → [0.5, 1]
        normalized = torch.where(preds < threshold, lower, upper).clamp(0.0, 1.0)
        has_range = ~torch.isnan(norm_min) & ~torch.isnan(norm_max)
        return torch.where(has_range, normalized, preds)

    @staticmethod
    def _apply_threshold(preds: torch.Tensor | None, threshold: torch.Tensor) -> torch.Tensor | None:
        # no threshold known: no decision (anomalib's default hands the scores back as "labels")
        if preds is None or torch.isnan(threshold).item():
            return None
        return preds > threshold

    @property
    def normalized_image_threshold(self) -> torch.Tensor:
        """0.5 moved by the sensitivity on normalised scores; the raw threshold (or NaN: no decision) when
        there was nothing to normalise with."""
        if self.enable_normalization and not torch.isnan(self.image_min) and not torch.isnan(self.image_max):
            return super().normalized_image_threshold
        return self.image_threshold

    @property
    def normalized_pixel_threshold(self) -> torch.Tensor:
        if self.enable_normalization and not torch.isnan(self.pixel_min) and not torch.isnan(self.pixel_max):
            return super().normalized_pixel_threshold
        return self.pixel_threshold


# -- the torch model ---------------------------------------------------------------------------------------


class ClipFusionModel(DynamicBufferMixin, nn.Module):
    """The detector as anomalib's inner ``torch.nn.Module``: ``[0, 1]`` images in, an
    :class:`~anomalib.data.InferenceBatch` out, with ``anomaly_map`` at the images' own resolution.

    The fitted state (text features, prompt embeddings, memory banks) is mirrored into registered buffers
    after every :meth:`fit`, so ``state_dict()`` and anomalib's checkpoints carry it and a checkpoint loads
    into an unfitted model (buffers are resized, as for WinCLIP). Loading does not re-fit the branches: the
    Lightning module re-fits from its recorded references in ``setup``.
    """

    def __init__(self, detector: CLIPFusion, batch_size: int | None = None) -> None:
        super().__init__()
        self.detector = detector  # a plain object, not a submodule: its models stay on its own device
        self.batch_size = batch_size
        for name in self._buffer_names():
            self.register_buffer(name, torch.empty(0))

    def _buffer_names(self) -> list[str]:
        names = ["clip_text_features", "clip_memory_bank", "diffusion_prompt_embeddings"]
        cfg = self.detector.config.diffusion
        for s in range(len(cfg.state_words)):
            for draw in range(cfg.n_noise):
                for b in range(len(cfg.feature_blocks)):
                    names.append(f"diffusion_memory_bank_{s}_{draw}_{b}")
        return names

    @property
    def is_fitted(self) -> bool:
        return self.detector.object_name is not None

    def fit(
        self, object_name: str, references: Sequence[Any] | torch.Tensor | None = None
    ) -> ClipFusionModel:
        """Prompts for ``object_name`` and memory banks from the references (see :meth:`CLIPFusion.fit`)."""
        self.detector.fit(object_name, references)
        self._mirror_state()
        return self

    def _mirror_state(self) -> None:
        """The buffers, from what each fitted branch saves (:meth:`~clipfusion.branches.Branch.state`): the
        same tensors a fitted folder holds, under the names anomalib's checkpoints know."""
        state: dict[str, torch.Tensor] = dict.fromkeys(self._buffer_names(), torch.empty(0))
        cfg = self.detector.config.diffusion
        for branch in self.detector.branches:
            saved = branch.state()
            if branch.name == "clip":
                for key in ("text_features", "memory_bank"):
                    if key in saved.tensors:
                        state[f"clip_{key}"] = saved.tensors[key]
            elif branch.name == "diffusion":
                order = {entry.get("state"): i for i, entry in enumerate(saved.meta.get("prompts", []))}
                if all(word in order for word in cfg.state_words):
                    embeddings = [
                        saved.tensors[f"prompt_embeddings.{order[word]}"] for word in cfg.state_words
                    ]
                    state["diffusion_prompt_embeddings"] = torch.cat(embeddings)
                for entry in saved.meta.get("memory_bank", []):
                    s, b = cfg.state_words.index(entry["state"]), cfg.feature_blocks.index(entry["block"])
                    state[f"diffusion_memory_bank_{s}_{entry['draw']}_{b}"] = saved.tensors[entry["tensor"]]
        for name, value in state.items():
            # a copy outside inference mode: the branches' tensors are inference tensors, which a later
            # load_state_dict could not write into
            setattr(self, name, value.detach().clone() if value.numel() else torch.empty(0))

    def predict_raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``(N,)`` and fused maps ``(N, S, S)`` at the output size, float32 on the CPU."""
        if not self.is_fitted:
            raise ConfigError(
                "ClipFusion is not set up: run it through anomalib's Engine (which calls setup), or call "
                "setup() / fit() first"
            )
        results = self.detector.predict(images.detach(), batch_size=self.batch_size)
        scores = torch.tensor([r.score for r in results], dtype=torch.float32)
        maps = torch.from_numpy(np.stack([r.anomaly_map for r in results])) if results else torch.empty(0)
        return scores, maps

    @staticmethod
    def inference_batch(scores: torch.Tensor, maps: torch.Tensor, images: torch.Tensor) -> InferenceBatch:
        """Scores and output-size maps as anomalib wants them: maps bilinear at the images' resolution, on
        the images' device."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return InferenceBatch(
            pred_score=scores.to(images.device), anomaly_map=resize_maps(maps, size).to(images.device)
        )

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        scores, maps = self.predict_raw(images)
        return self.inference_batch(scores, maps, images)


# -- the Lightning module ----------------------------------------------------------------------------------


def _to_tensor(path: Path) -> torch.Tensor:
    """One image file as anomalib's readers give it: ``(3, H, W)`` float32 in [0, 1] (through clipfusion's
    reader, which also handles 16-bit, palette, CMYK and EXIF rotation and names the file on errors)."""
    return to_dtype(to_image(load_image(path, min_side=MIN_SIDE)), torch.float32, scale=True)


class ClipFusion(AnomalibModule):
    """CLIPFusion as an anomalib model (zero-shot for ``shots=0`` without references, else few-shot).

    Args:
        preset: ``paper``, ``tiny`` or ``random-full`` (see clipfusion's README), unless ``config_file``.
        shots: k, the number of normal reference images. With ``references=None`` they are drawn from the
            data module's train split exactly as ``clipfusion evaluate`` draws them.
        seed: the seed of that draw.
        references: reference image files or folders instead of the train split; all of them are used when
            ``shots`` is 0, else ``shots`` of them are drawn with ``seed``.
        class_name: the product's name for the prompts; default: the data module's category through
            :func:`clipfusion.data.object_name`.
        weights_dir: a folder made by ``clipfusion weights fetch`` (the library never reads
            ``CLIPFUSION_WEIGHTS``).
        config_file: a saved clipfusion configuration (``.toml``/``.json``) instead of ``preset``.
        working_size: side (or ``(height, width)``) the pre-processor resizes images and masks to; the maps
            and metrics are at this resolution. ``None``: the images' own size.
        batch_size: images per forward pass inside CLIPFusion (default: the branches' own); anomalib's
            loader batch size only decides how many images arrive at once.
        options: detector options as a dict (``{"alpha_map": 0.3, "diffusion.timestep": 200}``), the form
            anomalib's command line can pass; ``**overrides`` take the same as keywords
            (``alpha_map=0.3, diffusion__timestep=200``).
        pre_processor, post_processor, evaluator, visualizer: as for every anomalib model; the defaults
            are :func:`working_size_pre_processor`, :class:`ClipFusionPostProcessor`, anomalib's image and
            pixel AUROC / F1 and its image visualiser.
    """

    def __init__(
        self,
        preset: str = "paper",
        shots: int = 0,
        seed: int = 0,
        references: Sequence[str | Path] | str | Path | None = None,
        class_name: str | None = None,
        *,
        weights_dir: str | Path | None = None,
        config_file: str | Path | None = None,
        working_size: int | tuple[int, int] | None = 512,
        batch_size: int | None = None,
        options: dict[str, Any] | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        **overrides: Any,
    ) -> None:
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise ConfigError(f"shots must be an integer >= 0, got {shots!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        check_batch_size(batch_size)  # refuses anything but a positive integer, now
        if pre_processor is True:
            pre_processor = working_size_pre_processor(working_size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.shots = shots
        self.seed = seed
        self.references = (
            None if references is None else [references] if isinstance(references, str | Path) else references
        )
        self.class_name = class_name
        settings = {**(options or {}), **overrides}
        if config_file is not None:
            config = load_config(config_file)
            if settings:
                config = with_overrides(config, {k.replace("__", "."): v for k, v in settings.items()})
            detector = CLIPFusion(config, weights_dir=weights_dir)
        else:
            detector = CLIPFusion.from_preset(preset, weights_dir=weights_dir, **settings)
        self.model = ClipFusionModel(detector, batch_size=batch_size)
        #: the object name and the reference files of the last setup
        self.object_name: str | None = None
        self.reference_files: list[str] = []
        self._fitted_for: tuple[str, tuple[str, ...]] | None = None
        # answers of the last validation pass, by (image path, pixel digest): anomalib validates on the
        # test images before testing, so the test pass can take them from here
        self._answers: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.computed_images = 0
        self.reused_images = 0

    @property
    def detector(self) -> CLIPFusion:
        """The :class:`~clipfusion.CLIPFusion` detector inside (e.g. for ``clipfusion.calibrate``)."""
        return self.model.detector

    # -- anomalib's contract ------------------------------------------------------------------------------
    @property
    def learning_type(self) -> LearningType:
        few = self.shots > 0 or bool(self.references)
        return LearningType.FEW_SHOT if few else LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def configure_optimizers() -> None:
        """Training-free: nothing to optimise."""
        return

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """anomalib's hook; ``image_size`` is the working size (default 512 × 512)."""
        return working_size_pre_processor(tuple(image_size) if image_size is not None else 512)

    def configure_post_processor(self) -> PostProcessor:
        return ClipFusionPostProcessor()

    # -- setup: object name and references ----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Fit the detector for the data module's product (prompts, and the memory banks of the references).

        Lightning calls this before every validate / test / predict; the detector is re-fitted only when the
        object name or the reference files change (another data module, another category).
        """
        del stage
        category = self._category()
        files = self._draw_references(category)
        key = (category, tuple(str(f) for f in files))
        if key == self._fitted_for:
            return
        self.model.fit(category, self._reference_images(files))
        self._fitted_for = key
        self._answers.clear()
        self.object_name = self.detector.object_name
        self.reference_files = [str(f) for f in files]
        # recorded with the hyperparameters, so checkpoints and logs say which images the run used
        self.hparams["reference_files"] = self.reference_files
        if files:
            logger.info(
                "ClipFusion: %d-shot for %r, references (seed %d): %s",
                len(files),
                self.object_name,
                self.seed,
                ", ".join(self.reference_files),
            )
        else:
            logger.info("ClipFusion: zero-shot for %r", self.object_name)
        self._say_random_weights()

    def _say_random_weights(self) -> None:
        """anomalib prints metrics and pictures, none of which can carry a label: with random weights
        (``tiny``, ``random-full``) say so, as every clipfusion command does before a score or a metric."""
        banner = random_weights_banner(self.detector.config)
        if banner:
            logger.warning("ClipFusion: %s", banner)

    def _datamodule(self) -> Any:
        trainer = getattr(self, "_trainer", None)
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _category(self) -> str:
        if self.class_name is not None:
            return self.class_name
        category = getattr(self._datamodule(), "category", None)
        if not category:
            raise ConfigError(
                "ClipFusion needs the product's name for its prompts: pass class_name=... (no data module "
                "category to take it from)"
            )
        return str(category)

    def _draw_references(self, category: str) -> list[Path]:
        """The reference files: ``shots`` of the train split's (or of ``references``) drawn as
        ``clipfusion evaluate`` draws them."""
        if self.references is not None:
            files, problems = collect_images(self.references)
            if problems:
                raise InputErrors(problems)
            source = "the references given"
            k = self.shots or len(files)
        else:
            if self.shots == 0:
                return []
            train = getattr(self._datamodule(), "train_data", None)
            samples = getattr(train, "samples", None)
            if samples is None or len(samples) == 0:
                raise ConfigError(
                    f"ClipFusion(shots={self.shots}) needs normal reference images: give "
                    "references=[files or folders], or a data module with a train split"
                )
            labels = samples["label_index"] if "label_index" in samples else [0] * len(samples)
            paths = zip(samples["image_path"], labels, strict=True)
            files = [Path(p) for p, label in paths if int(label) == 0]
            source = "the train split"
            k = self.shots
        pool = [Sample(Path(f), 0, None, "good", category) for f in files]
        try:
            chosen = sample_references(pool, k, self.seed)
        except InputError as exc:
            raise InputError(f"ClipFusion references from {source}: {exc}") from exc
        return [s.image_path for s in chosen]

    def _reference_images(self, files: Sequence[Path]) -> torch.Tensor | list[Any]:
        """The references as the queries will arrive: ``[0, 1]`` tensors through the pre-processor's
        transform, stacked (or the files themselves when they keep different sizes)."""
        if not files:
            return []
        transform = getattr(self.pre_processor, "transform", None)
        tensors = [_to_tensor(f) for f in files]
        if transform is not None:
            tensors = [transform(t) for t in tensors]
        if len({tuple(t.shape) for t in tensors}) > 1:
            return list(files)
        return torch.stack(tensors)

    def val_dataloader(self) -> list[Any]:
        """No validation data of its own. Lightning asks the model only when neither a data module nor
        loaders were given, as anomalib's ``Engine.predict(data_path=...)`` does before predicting: the
        post-processor then learns no statistics, and scores and maps stay raw (no labels or masks)."""
        return []

    # -- steps --------------------------------------------------------------------------------------------
    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        del args, kwargs
        return self._answer(batch, remember=True)

    def test_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        del args, kwargs
        return self._answer(batch, remember=False)

    def predict_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        del args, kwargs
        return self._answer(batch, remember=False)

    def on_validation_epoch_start(self) -> None:
        self._answers.clear()

    def on_test_epoch_end(self) -> None:
        self._answers.clear()
        self._say_random_weights()  # again, right before anomalib prints the test metrics

    def on_predict_epoch_end(self) -> None:
        self._answers.clear()

    def _answer(self, batch: Batch, *, remember: bool) -> Batch:
        images = batch.image
        keys = _content_keys(images, batch.image_path)
        known = [self._answers.get(key) for key in keys] if keys is not None else []
        if keys is not None and known and all(answer is not None for answer in known):
            scores = torch.stack([answer[0] for answer in known])  # type: ignore[index]
            maps = torch.stack([answer[1] for answer in known])  # type: ignore[index]
            self.reused_images += len(keys)
        else:
            scores, maps = self.model.predict_raw(images)
            self.computed_images += len(scores)
            if remember and keys is not None:
                self._answers.update(zip(keys, zip(scores, maps, strict=True), strict=True))
        return batch.update(**self.model.inference_batch(scores, maps, images)._asdict())


def _content_keys(images: torch.Tensor, paths: Sequence[str] | None) -> list[tuple[str, str]] | None:
    """(path, digest of the pixels) per image: the same file pre-processed the same way gets the same key."""
    if paths is None or len(paths) != len(images):
        return None
    pixels = images.detach().to("cpu", torch.float32).contiguous().numpy()
    return [
        (str(path), hashlib.blake2b(pixels[i].tobytes(), digest_size=16).hexdigest())
        for i, path in enumerate(paths)
    ]


__all__ = [
    "TESTED_ANOMALIB",
    "ClipFusion",
    "ClipFusionModel",
    "ClipFusionPostProcessor",
    "working_size_pre_processor",
]
