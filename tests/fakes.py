"""A model-free stand-in for a branch: maps from pixel statistics, with the branches' interface.

It lets the detector, fusion, evaluation and CLI plumbing be tested exactly (known maps in, known fused
maps out) and quickly, independently of the real branches, which have tests of their own.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image


class FakeBranch:
    def __init__(self, kind: str, size: int = 32, batch_size: int = 4) -> None:
        assert kind in ("clip", "diffusion")
        self.kind = kind
        self.prefix = "clip" if kind == "clip" else "diff"
        self.size = size
        self.config = SimpleNamespace(batch_size=batch_size, output_size=size)
        self.bank: torch.Tensor | None = None
        self.object_name: str | None = None
        self.batches: list[int] = []

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        arrays = [
            np.asarray(img.convert("RGB").resize((self.size, self.size)), dtype=np.float32) / 255.0
            for img in images
        ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def fit(self, object_name: str, references: list[Image.Image]) -> None:
        self.object_name = object_name
        self.bank = self._pixels(references) if references else None

    def predict(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        self.batches.append(len(images))
        x = self._pixels(images)
        # a weak "language" map (a tenth of the brightness), so that in few-shot runs the fused map is
        # dominated by the reference differences, as the real method's is by its memory-bank maps
        gray = 0.1 * x.mean(1)
        out = {f"{self.prefix}_L": gray}
        if self.kind == "clip":
            out["s_clip_L"] = gray.mean((1, 2))
        if self.bank is not None:
            diff = (x[:, None] - self.bank[None]).abs().mean(2)  # N, K, s, s
            out[f"{self.prefix}_V"] = diff.amin(1)
        return out


def fake_detector(config=None, size: int = 32):
    from clipfusion.config import load_preset
    from clipfusion.detector import CLIPFusion

    config = config or load_preset("tiny").replace(output_size=size)
    return CLIPFusion(config, clip=FakeBranch("clip", size), diffusion=FakeBranch("diffusion", size))
