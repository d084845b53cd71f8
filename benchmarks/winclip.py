"""anomalib's WinCLIP, the baseline: the same ViT-B-16-plus-240, timed as anomalib ships it."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks.common import OBJECT


def import_winclip() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import anomalib.models.image.winclip.torch_model as winclip_module
    return winclip_module


class WinCLIPBaseline:
    """anomalib's ``WinClipModel`` around an open_clip model of the CLIP branch's architecture and seeded
    weights, in ``dtype``, one instance per regime sharing that model.

    anomalib's constructor would download ``laion400m_e31``; ``open_clip.create_model_and_transforms`` is
    replaced for the duration of the constructor only. anomalib 2.x runs its window embeddings through the
    batch-first open_clip transformer with a sequence-first layout (see
    tests/branches/test_patchclip_fidelity.py): it is timed as shipped, since that is what its users run.
    "As shipped" means float32 (anomalib's default); another dtype is the same model cast.
    """

    def __init__(
        self, clip_config: Any, device: str, dtype: torch.dtype, preprocess: Callable[[Any], torch.Tensor]
    ) -> None:
        from clipfusion.models.clip import load_open_clip

        self.module = import_winclip()
        self.device = torch.device(device)
        self.dtype = dtype
        # WinCLIP's transform is PatchCLIP's pre-processing (bicubic to 240, CLIP mean/std): both detectors
        # start from the same decoded images
        self.preprocess = preprocess
        self.clip, _ = load_open_clip(
            clip_config.model,
            "random" if clip_config.weights == "random" else clip_config.checkpoint,
            device=self.device,
            dtype=dtype,
            init_seed=clip_config.init_seed,
        )
        self.models: dict[int, Any] = {}

    def setup(self, shots: int, references: Sequence[Any]) -> Any:
        """The model for ``shots`` references (0: zero-shot), text and visual embeddings collected."""
        winclip_module = self.module
        original = winclip_module.open_clip.create_model_and_transforms

        def our_model(*_args: Any, **_kwargs: Any) -> tuple[Any, None, None]:
            return self.clip, None, None

        winclip_module.open_clip.create_model_and_transforms = our_model
        try:
            model = winclip_module.WinClipModel(class_name=None)
        finally:
            winclip_module.open_clip.create_model_and_transforms = original
        model = model.to(self.device).eval()
        refs = self.pixels(references[:shots]) if shots else None
        with torch.no_grad():
            model.setup(OBJECT, refs)
        self.models[shots] = model
        return model

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        return self.preprocess(images).to(self.device, self.dtype)

    def predict(self, shots: int, images: Sequence[Any]) -> Any:
        """From decoded images to scores and maps, as CLIPFusion's ``predict`` is timed."""
        out = self.models[shots](self.pixels(images))
        return out.pred_score.float().cpu(), out.anomaly_map.float().cpu()
