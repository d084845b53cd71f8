"""PatchCLIP: the CLIP branch of CLIPFusion (language-guided map ``clip_L``, memory-bank map ``clip_V``).

One forward pass of the OpenCLIP image tower per image gives the global embedding (image score
``s_clip_L``), the final-layer patch tokens after ``ln_post`` (memory bank, as WinCLIP+) and the same tokens
through the projection (compared with the text features). The branch takes PIL images or a batch of ``[0, 1]``
float tensors and returns tensors; loading lives in :mod:`clipfusion.models.clip`, so tests and comparisons
can hand it any open_clip model.

``patch_mode`` chooses the unit a map is computed on:

- ``tokens`` (default): one unit per patch token (15×15 for a 240 px ViT-B/16).
- ``windows``: WinCLIP window embeddings at one scale: every ``window_size`` × ``window_size`` block of
  tokens (stride 1) is run through the transformer on its own with the class token, pooled and projected,
  as anomalib's ``_get_window_embeddings`` does; a patch's score is the **harmonic mean** of the scores of
  the windows that cover it (WinCLIP's aggregation; it favours low scores, so a defect has to show in every
  window around a patch). Both maps use the window embeddings (the bank holds the references' windows).
- ``crops``: the image is cut into ``crop_grid`` × ``crop_grid`` tiles, each resized and encoded as an
  image; one unit per tile, using the tile's image embedding for both maps.

``s_clip_L`` is always the zero-shot probability of the anomalous prompts for the whole image, as WinCLIP.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clipfusion.branches import BranchState, TextSide, resolve_batch_size
from clipfusion.branches.memory import nearest_neighbour_distance
from clipfusion.config import PatchCLIPConfig, load_preset, with_overrides
from clipfusion.errors import ClipfusionError, ConfigError, InputError
from clipfusion.maps import resize_maps
from clipfusion.prompts import clip_prompt_ensemble
from clipfusion.runtime import resolve_device, resolve_dtype

Images = Sequence[Image.Image] | torch.Tensor


class ImageFeatures(NamedTuple):
    """What one forward pass of the image tower gives, in the model's dtype."""

    image: torch.Tensor
    """``(N, D)`` global image embedding (projected, not normalised)."""
    tokens: torch.Tensor
    """``(N, P, W)`` final-layer patch tokens after ``ln_post``, before the projection."""
    projected: torch.Tensor
    """``(N, P, D)`` the same tokens through the projection, in the text embedding space."""
    embedded: torch.Tensor | None
    """``(N, 1 + P, W)`` transformer input before ``ln_pre`` (only kept when windows need it)."""


class PatchFeatures(NamedTuple):
    """Per-mode units of a batch: the features the maps are computed from."""

    image: torch.Tensor
    """``(N, D)`` global image embeddings, for ``s_clip_L``."""
    language: torch.Tensor
    """``(N, U, D)`` unit features compared with the text features, for ``clip_L``."""
    visual: torch.Tensor
    """``(N, U, Dv)`` unit features compared with the memory bank, for ``clip_V``."""


class PatchCLIP:
    """The CLIP branch (a :class:`~clipfusion.branches.Branch`): ``fit(object_name, references)`` then
    ``predict(images)``.

    The model is moved (in place, as ``nn.Module.to`` does) to the configuration's device and dtype and put in
    eval mode. Text features are cached per object name for the life of the instance; the memory bank is
    replaced by every ``fit``. The pixel statistics come from the model's open_clip pre-processing
    configuration (the pretrained tag's, for ViT-B-16-plus-240 OpenAI CLIP's mean and std, as WinCLIP uses).
    """

    name = "clip"
    map_names = ("clip_L", "clip_V")

    def __init__(self, model: nn.Module, tokenizer: Any, config: PatchCLIPConfig | None = None) -> None:
        self.config = (config if config is not None else PatchCLIPConfig()).placed()
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self._text = TextSide(tokenizer=tokenizer)  # shared by every view of this branch (:meth:`share`)
        #: whether :meth:`release_text_encoder` frees the text side (a view leaves that to its models)
        self.owns_text_encoder = True
        self._visual = _checked_visual(model)
        self.grid_size: tuple[int, int] = tuple(self._visual.grid_size)  # type: ignore[assignment]
        model_size = tuple(self._visual.image_size)
        if model_size != (self.config.image_size, self.config.image_size):
            raise ConfigError(
                f"clip.image_size {self.config.image_size} does not match the input size {model_size} of "
                f"the CLIP model {self.config.model!r}"
            )
        if self.config.patch_mode == "windows" and self.config.window_size > min(self.grid_size):
            raise ConfigError(
                f"clip.window_size {self.config.window_size} is larger than the token grid {self.grid_size}"
            )
        mean, std = pixel_statistics(model)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._window_index = _window_index(self.grid_size, self.config.window_size).to(self.device)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.object_name: str | None = None
        self.memory_bank: torch.Tensor | None = None
        self._shots = 0

    # -----------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_config(
        cls,
        config: PatchCLIPConfig,
        *,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        text_encoder: bool = True,
        objects: Sequence[str] = (),
    ) -> PatchCLIP:
        """Load the model the configuration names (tag, local checkpoint or random) and wrap it.

        ``local_files_only`` keeps the hub out of it (default: the hub library's own offline setting).
        ``text_encoder=False`` drops the text tower as soon as the weights are loaded (open_clip builds both
        towers together): for a branch that gets its text features from :meth:`load_state`. ``objects``
        are the object names the branch will be fitted for: their text features are computed and the text
        tower dropped before this returns (as :meth:`prepare` then :meth:`release_text_encoder`).
        """
        from clipfusion.models.clip import load_open_clip

        config = config.placed()
        device = resolve_device(config.device)
        model, tokenizer = load_open_clip(
            config.model,
            "random" if config.weights == "random" else config.checkpoint,
            device=device,
            dtype=resolve_dtype(config.dtype, device),
            init_seed=config.init_seed,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        branch = cls(model, tokenizer, config)
        if text_encoder:
            branch.prepare(objects)
        if objects or not text_encoder:
            branch.release_text_encoder()
        return branch

    @classmethod
    def from_preset(cls, name: str = "paper", *, cache_dir: str | None = None, **options: Any) -> PatchCLIP:
        """A preset's CLIP branch (with the preset's placement); ``options`` override
        :class:`PatchCLIPConfig` fields by name."""
        config = with_overrides(load_preset(name).branch_configs()[0], options)
        return cls.from_config(config, cache_dir=cache_dir)

    def share(self, config: PatchCLIPConfig) -> PatchCLIP:
        """A branch for another fitted object with ``config``, on this very model: its own text features,
        memory bank and options, no copy and no load (the configuration must name the same model on the same
        device in the same dtype, as :class:`clipfusion.shared.SharedModels` checks). Text features already
        computed here are handed on when they were computed the same way."""
        view = type(self)(self.model, None, config)
        view._text = self._text
        view.owns_text_encoder = False
        if view.config.normalize_prompt_embeddings == self.config.normalize_prompt_embeddings:
            view._text_cache.update(self._text_cache)
        return view

    @property
    def tokenizer(self) -> Any:
        return self._text.tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._text.tokenizer = value

    @property
    def default_batch_size(self) -> int:
        return self.config.batch_size

    @property
    def shots(self) -> int:
        """Reference images in the memory bank (0: zero-shot)."""
        return self._shots

    # -----------------------------------------------------------------------------------------------------
    # the estimator interface

    def fit(self, object_name: str, references: Images | None = None) -> PatchCLIP:
        """Prepare for one object: its text features and, given references, the memory bank (few-shot).

        No references means zero-shot: ``predict`` then returns no ``clip_V``.
        """
        references = _checked_images([] if references is None else references, "reference")
        self.text_features(object_name)
        self.object_name = object_name
        self.memory_bank = None
        self._shots = len(references)
        if len(references):
            with torch.inference_mode():
                units = [
                    self.features(references[i : i + self.config.batch_size]).visual
                    for i in range(0, len(references), self.config.batch_size)
                ]
            bank = torch.cat(units)
            self.memory_bank = bank.reshape(-1, bank.shape[-1])
        return self

    def predict(
        self, images: Images, *, batch_size: int | None = None, native: bool = False
    ) -> dict[str, torch.Tensor]:
        """Maps and scores of a list of images (or an ``(N, 3, H, W)`` tensor in [0, 1]), as float32 CPU
        tensors, ``batch_size`` images per pass.

        ``clip_L`` ``(N, S, S)``: probability of the anomalous prompts per unit, upsampled (bilinear) to
        ``S = output_size``; ``s_clip_L`` ``(N,)``: the same probability for the global image embedding;
        after a few-shot ``fit``, ``clip_V`` ``(N, S, S)``: distance to the nearest reference unit. With
        ``native`` the maps stay on the unit grid (tokens and windows: the token grid, 15×15 for a 240 px
        ViT-B/16; crops: ``crop_grid`` × ``crop_grid``).
        """
        if self.object_name is None:
            raise ClipfusionError("PatchCLIP.predict was called before fit(object_name, references)")
        images = _checked_images(images, "image")
        batch = resolve_batch_size(batch_size, self.config.batch_size)
        text = self.text_features(self.object_name)
        outputs: dict[str, list[torch.Tensor]] = {}
        with torch.inference_mode():
            for start in range(0, len(images), batch):
                features = self.features(images[start : start + batch])
                maps = self.maps_from_features(features, text, self.memory_bank, native=native)
                for key, value in maps.items():
                    outputs.setdefault(key, []).append(value)
        if not outputs:  # no images: empty tensors of the right shapes
            size = self.config.output_size
            if native:
                size = self.config.crop_grid if self.config.patch_mode == "crops" else self.grid_size[0]
            empty = {"clip_L": torch.empty(0, size, size), "s_clip_L": torch.empty(0)}
            if self.memory_bank is not None:
                empty["clip_V"] = torch.empty(0, size, size)
            return empty
        return {key: torch.cat(values) for key, values in outputs.items()}

    def text_features(self, object_name: str) -> torch.Tensor:
        """``(2, D)`` float32: row 0 the normal, row 1 the anomalous prompt ensemble, L2-normalised.

        Each class is the mean of its raw prompt embeddings (as anomalib's WinCLIP), or of the L2-normalised
        ones with ``normalize_prompt_embeddings`` (as CLIP's ImageNet ensembling), then normalised.
        Computed once per object name.
        """
        if not isinstance(object_name, str) or not object_name.strip():
            raise InputError(f"object name must be a non-empty string, got {object_name!r}")
        cached = self._text_cache.get(object_name)
        if cached is not None:
            return cached
        if self.text_encoder_released:
            raise ClipfusionError(
                f"the CLIP text encoder was released to save memory; {object_name!r} was not prepared "
                "before (prepare every object name before release_text_encoder, or name it in the "
                "detector's objects)"
            )
        rows = []
        with torch.inference_mode():
            for prompts in clip_prompt_ensemble(object_name):
                tokens = self.tokenizer(prompts).to(self.device)
                embeddings = self.model.encode_text(tokens).float()
                if self.config.normalize_prompt_embeddings:
                    embeddings = F.normalize(embeddings, dim=-1)
                rows.append(embeddings.mean(dim=0))
            features = F.normalize(torch.stack(rows), dim=-1)
        self._text_cache[object_name] = features
        return features

    def prepare(self, object_names: Iterable[str]) -> None:
        """Cache the text features of every object name, e.g. before :meth:`release_text_encoder`."""
        for name in object_names:
            self.text_features(name)

    @property
    def text_encoder_released(self) -> bool:
        return getattr(self.model, "transformer", None) is None

    def release_text_encoder(self) -> None:
        """Free the text tower once every object's text features are cached (a third of ViT-B-16+'s weights).

        Only the image tower is needed to score images; asking for an object whose features were not cached
        afterwards is a clear error rather than a silent reload. A view (:meth:`share`) leaves the text side
        to its models.
        """
        if not self.owns_text_encoder:
            return
        self.tokenizer = None  # open_clip's BPE tables: ~40 MB of Python objects
        for name in ("transformer", "token_embedding", "ln_final"):
            if hasattr(self.model, name):
                setattr(self.model, name, None)
        for name in ("positional_embedding", "text_projection"):
            if isinstance(getattr(self.model, name, None), torch.nn.Parameter):
                delattr(self.model, name)
                setattr(self.model, name, None)

    # -----------------------------------------------------------------------------------------------------
    # saving and loading the fitted state (the model weights stay where they came from)

    def state(self) -> BranchState:
        """The fitted object's text features (``text_features``, float32 ``(2, D)``) and, few-shot, the
        memory bank (``memory_bank``, ``(M, W)`` in the model's dtype), as CPU tensors."""
        if self.object_name is None:
            raise ClipfusionError("PatchCLIP.state: the branch is not fitted")
        tensors = {"text_features": self.text_features(self.object_name).cpu()}
        if self.memory_bank is not None:
            tensors["memory_bank"] = self.memory_bank.cpu()
        return BranchState(tensors, {"object_name": self.object_name, "shots": self._shots})

    def load_state(self, state: BranchState) -> None:
        """Become fitted from :meth:`state` (of a branch with the same weights), text tower or not."""
        object_name = state.meta.get("object_name")
        if not isinstance(object_name, str) or not object_name:
            raise InputError("clip state: no object name")
        text = _state_tensor(state, "text_features", "clip")
        width = int(self._visual.proj.shape[1])
        if text.ndim != 2 or tuple(text.shape) != (2, width):
            raise InputError(f"clip state: text_features of shape {tuple(text.shape)}, expected (2, {width})")
        bank = state.tensors.get("memory_bank")
        if bank is not None and (bank.ndim != 2 or bank.shape[0] == 0):
            raise InputError(f"clip state: memory_bank of shape {tuple(bank.shape)}, expected (M, W)")
        self._text_cache[object_name] = text.to(device=self.device, dtype=torch.float32)
        self.memory_bank = None if bank is None else bank.to(self.device)
        self.object_name = object_name
        self._shots = int(state.meta.get("shots", 0)) if bank is not None else 0

    def weights_fingerprint(self) -> str:
        """Fingerprint of the image tower, the only weights :meth:`predict` uses."""
        from clipfusion.models.weights import weights_fingerprint

        return weights_fingerprint({"visual": self._visual})

    # -----------------------------------------------------------------------------------------------------
    # stages, public so that a speed harness can time them one by one

    def preprocess(self, images: Images) -> torch.Tensor:
        """``(N, 3, H, W)`` float32 pixels: RGB, bicubic resize to ``image_size``, CLIP mean/std.

        Non-square images are stretched rather than centre-cropped, so that the map covers the whole image.
        PIL images are resized by PIL and come back on the CPU. A float tensor ``(N, 3, H, W)`` in [0, 1]
        stays on its device and gets PIL's computation in float: the antialiased bicubic filter
        (``a = -0.5``), width first, then height, clipped to [0, 1] after each pass as PIL clips. Only PIL's
        rounding to 8 bits after each pass is missing, so the pixels agree with the PIL path to about 1/255.
        """
        size = self.config.image_size
        if isinstance(images, torch.Tensor):
            pixels = images.float()
            for shape in ((pixels.shape[-2], size), (size, size)):
                if pixels.shape[-2:] != shape:
                    pixels = F.interpolate(
                        pixels, size=shape, mode="bicubic", align_corners=False, antialias=True
                    ).clamp(0.0, 1.0)
            return (pixels - self._mean.to(pixels.device)) / self._std.to(pixels.device)
        arrays = [
            np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
            for image in images
        ]
        if not arrays:
            return torch.empty(0, 3, size, size)
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)
        return (pixels - self._mean) / self._std

    def preprocess_crops(self, images: Images) -> torch.Tensor:
        """``(N · n², 3, H, W)``: each image's ``n × n`` tiles (row-major), each pre-processed as an image."""
        n = self.config.crop_grid
        if isinstance(images, torch.Tensor):
            height, width = images.shape[-2:]
            xs = [round(k * width / n) for k in range(n + 1)]
            ys = [round(k * height / n) for k in range(n + 1)]
            per_tile = [
                self.preprocess(
                    images[..., ys[i] : max(ys[i + 1], ys[i] + 1), xs[j] : max(xs[j + 1], xs[j] + 1)]
                )
                for i in range(n)
                for j in range(n)
            ]
            return torch.stack(per_tile, dim=1).flatten(0, 1)  # image by image, tiles row-major
        tiles = []
        for image in images:
            width, height = image.size
            xs = [round(k * width / n) for k in range(n + 1)]
            ys = [round(k * height / n) for k in range(n + 1)]
            for i in range(n):
                for j in range(n):
                    box = (xs[j], ys[i], max(xs[j + 1], xs[j] + 1), max(ys[i + 1], ys[i] + 1))
                    tiles.append(image.crop(box))
        return self.preprocess(tiles)

    def encode(self, pixels: torch.Tensor, *, keep_embedded: bool = False) -> ImageFeatures:
        """One forward pass of the image tower, keeping what the maps need.

        Written out from open_clip's ``VisionTransformer`` parts (the same operations as ``encode_image``,
        so the global embedding is identical) because the patch tokens both before and after the
        projection, and for windows the transformer input, are needed from the same pass.
        """
        visual = self._visual
        x = pixels.to(device=self.device, dtype=self.dtype)
        x = visual.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        embedded = x if keep_embedded else None
        x = visual.ln_pre(visual.patch_dropout(x))
        x = self._transformer(x)
        x = visual.ln_post(x)
        pooled, tokens = visual._global_pool(x)
        return ImageFeatures(pooled @ visual.proj, tokens, tokens @ visual.proj, embedded)

    def window_embeddings(self, embedded: torch.Tensor) -> torch.Tensor:
        """``(N, n_windows, D)``: each window of tokens (with the class token) through the transformer alone.

        The tokens already carry their positional embeddings (taken before ``ln_pre``), as in anomalib's
        ``_get_window_embeddings``; windows are ordered row-major by their top-left token.
        """
        visual = self._visual
        batch, n_windows = embedded.shape[0], self._window_index.shape[0]
        x = embedded[:, self._window_index].reshape(batch * n_windows, self._window_index.shape[1], -1)
        x = visual.ln_pre(visual.patch_dropout(x))
        x = visual.ln_post(self._transformer(x))
        pooled, _ = visual._global_pool(x)
        return (pooled @ visual.proj).reshape(batch, n_windows, -1)

    def features(self, images: Images) -> PatchFeatures:
        """The units of the configured ``patch_mode`` for a batch of images."""
        mode = self.config.patch_mode
        encoded = self.encode(self.preprocess(images), keep_embedded=mode == "windows")
        if mode == "tokens":
            return PatchFeatures(encoded.image, encoded.projected, encoded.tokens)
        if mode == "windows":
            assert encoded.embedded is not None
            windows = self.window_embeddings(encoded.embedded)
            return PatchFeatures(encoded.image, windows, windows)
        tiles = self.encode(self.preprocess_crops(images)).image
        tiles = tiles.reshape(len(images), self.config.crop_grid**2, -1)
        return PatchFeatures(encoded.image, tiles, tiles)

    def maps_from_features(
        self,
        features: PatchFeatures,
        text_features: torch.Tensor,
        memory_bank: torch.Tensor | None = None,
        *,
        native: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Scores and maps (float32, CPU) from a batch's units: ``s_clip_L``, ``clip_L`` and ``clip_V``
        (at the output size, or with ``native`` on the unit grid)."""
        text = text_features.to(self.device, torch.float32)
        image = F.normalize(features.image.float(), dim=-1)
        outputs = {"s_clip_L": self._anomalous_probability(image, text).cpu()}
        language = F.normalize(features.language.float(), dim=-1)
        outputs["clip_L"] = self._to_map(self._anomalous_probability(language, text), native).cpu()
        if memory_bank is not None:
            # 1 - cos can come out a hair below 0 in floating point; the harmonic mean needs it >= 0
            distance = nearest_neighbour_distance(
                features.visual, memory_bank, distance=self.config.distance
            ).clamp_min(0.0)
            outputs["clip_V"] = self._to_map(distance, native).cpu()
        return outputs

    # -----------------------------------------------------------------------------------------------------

    def _anomalous_probability(self, normalized: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        logits = normalized @ text.T / self.config.temperature
        return logits.softmax(dim=-1)[..., 1]

    def _to_map(self, scores: torch.Tensor, native: bool = False) -> torch.Tensor:
        """``(N, U)`` unit scores → ``(N, S, S)`` map, bilinear from the unit grid (``native``: the grid)."""
        mode = self.config.patch_mode
        if mode == "tokens":
            grid = scores.reshape(scores.shape[0], *self.grid_size)
        elif mode == "windows":
            grid = harmonic_aggregation(scores, self.grid_size, self.config.window_size)
        else:
            grid = scores.reshape(scores.shape[0], self.config.crop_grid, self.config.crop_grid)
        return grid.float() if native else resize_maps(grid, self.config.output_size)

    def _transformer(self, x: torch.Tensor) -> torch.Tensor:
        transformer = self._visual.transformer
        if hasattr(transformer, "batch_first"):  # open_clip >= 2.26 takes (N, L, D) whatever it runs
            return transformer(x)
        return transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # older open_clip: (L, N, D)


def harmonic_aggregation(
    window_scores: torch.Tensor, grid_size: tuple[int, int], window: int
) -> torch.Tensor:
    """``(N, n_windows)`` → ``(N, H, W)``: per patch, the harmonic mean of the windows covering it.

    A window scoring exactly 0 makes its patches 0 (as WinCLIP's implementation).
    """
    height, width = grid_size
    rows, cols = height - window + 1, width - window + 1
    inverse = 1.0 / window_scores.float().reshape(-1, rows, cols)
    inverse_sum = inverse.new_zeros(inverse.shape[0], height, width)
    count = inverse.new_zeros(height, width)
    for dy in range(window):
        for dx in range(window):
            inverse_sum[:, dy : dy + rows, dx : dx + cols] += inverse
            count[dy : dy + rows, dx : dx + cols] += 1
    return count / inverse_sum


def _window_index(grid_size: tuple[int, int], window: int) -> torch.Tensor:
    """``(n_windows, 1 + window²)`` token indices: the class token (0) then the window's patches (+1)."""
    height, width = grid_size
    window = min(window, height, width)
    patches = torch.arange(height * width).reshape(height, width)
    index = [
        patches[i : i + window, j : j + window].reshape(-1) + 1
        for i in range(height - window + 1)
        for j in range(width - window + 1)
    ]
    windows = torch.stack(index)
    return torch.cat([torch.zeros(windows.shape[0], 1, dtype=windows.dtype), windows], dim=1)


def pixel_statistics(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of the model's open_clip pre-processing configuration (set from the pretrained tag or the
    architecture's config when the model was built; OpenAI CLIP's statistics when neither says)."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = tuple(float(v) for v in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", open_clip.OPENAI_DATASET_STD))
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"the CLIP model's pre-processing gives mean {mean} and std {std}: expected RGB")
    return mean, std


def _checked_visual(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", None)
    needed = ("conv1", "class_embedding", "positional_embedding", "patch_dropout", "ln_pre", "transformer")
    needed += ("ln_post", "proj", "_global_pool", "grid_size", "image_size")
    missing = [name for name in needed if not hasattr(visual, name)]
    if visual is None or missing:
        raise ConfigError(
            "PatchCLIP needs an open_clip ViT image tower (missing: "
            f"{', '.join(missing) if visual is not None else 'visual'})"
        )
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
        raise ConfigError("PatchCLIP does not support image towers with attentional pooling or late ln_post")
    if getattr(visual, "proj", None) is None:
        raise ConfigError("PatchCLIP needs an image tower with a projection into the text space")
    return visual


def _state_tensor(state: BranchState, key: str, branch: str) -> torch.Tensor:
    tensor = state.tensors.get(key)
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"{branch} state: no {key!r} tensor")
    return tensor


def _checked_images(images: Images, what: str) -> list[Image.Image] | torch.Tensor:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise InputError(
                f"expected {what}s as a float (N, 3, H, W) tensor in [0, 1], got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if min(images.shape[-2:], default=0) < 1:
            raise InputError(f"{what}s: empty images of size {tuple(images.shape[-2:])}")
        return images
    if isinstance(images, Image.Image):
        raise InputError(f"expected a list of {what}s, got a single PIL image")
    checked = list(images)
    for i, image in enumerate(checked):
        if not isinstance(image, Image.Image):
            raise InputError(f"{what} {i}: expected a PIL image, got {type(image).__name__}")
        if min(image.size) < 1:
            raise InputError(f"{what} {i}: empty image of size {image.size}")
    return checked
