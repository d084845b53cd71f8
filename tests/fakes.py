"""A model-free stand-in for a branch: maps from pixel statistics, implementing
:class:`clipfusion.branches.Branch`.

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
        self.name = kind
        self.prefix = "clip" if kind == "clip" else "diff"
        self.map_names = (f"{self.prefix}_L", f"{self.prefix}_V")
        self.size = size
        self.config = SimpleNamespace(batch_size=batch_size, output_size=size)
        self.memory_bank: torch.Tensor | None = None
        self.object_name: str | None = None
        self.batches: list[int] = []
        self.prepared: list[str] = []
        self.released = False

    @property
    def default_batch_size(self) -> int:
        return self.config.batch_size

    @property
    def shots(self) -> int:
        return 0 if self.memory_bank is None else len(self.memory_bank)

    def _pixels(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor):  # a float (N, 3, H, W) batch in [0, 1]
            if images.shape[-2:] == (self.size, self.size):
                return images.float()
            return torch.nn.functional.interpolate(
                images.float(), size=(self.size, self.size), mode="bilinear"
            )
        arrays = [
            np.asarray(img.convert("RGB").resize((self.size, self.size)), dtype=np.float32) / 255.0
            for img in images
        ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def fit(self, object_name: str, images: list[Image.Image] | None = None) -> FakeBranch:
        self.object_name = object_name
        self.memory_bank = self._pixels(images) if images is not None and len(images) else None
        return self

    def prepare(self, object_names) -> None:
        self.prepared.extend(object_names)

    def release_text_encoder(self) -> None:
        self.released = True

    def state(self):
        from clipfusion.branches import BranchState

        tensors = {} if self.memory_bank is None else {"memory_bank": self.memory_bank}
        return BranchState(tensors, {"object_name": self.object_name})

    def load_state(self, state) -> None:
        self.object_name = state.meta["object_name"]
        self.memory_bank = state.tensors.get("memory_bank")

    def weights_fingerprint(self) -> str:
        return f"fake-{self.name}-{self.size}"

    def predict(
        self, images: list[Image.Image], *, batch_size: int | None = None, native: bool = False
    ) -> dict[str, torch.Tensor]:
        from clipfusion.maps import resize_maps

        batch = batch_size or self.default_batch_size
        out: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(images), batch):
            for key, value in self._predict_batch(images[start : start + batch]).items():
                out.setdefault(key, []).append(value)
        # the fake's native grid is its `size`
        return {
            key: torch.cat(values)
            if native or key == "s_clip_L"
            else resize_maps(torch.cat(values), self.config.output_size)
            for key, values in out.items()
        }

    def _predict_batch(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        self.batches.append(len(images))
        x = self._pixels(images)
        # a weak "language" map (a tenth of the brightness), so that in few-shot runs the fused map is
        # dominated by the reference differences, as the real method's is by its memory-bank maps
        gray = 0.1 * x.mean(1)
        out = {f"{self.prefix}_L": gray}
        if self.name == "clip":
            out["s_clip_L"] = gray.mean((1, 2))
        if self.memory_bank is not None:
            diff = (x[:, None] - self.memory_bank[None]).abs().mean(2)  # N, K, s, s
            out[f"{self.prefix}_V"] = diff.amin(1)
        return out


def fake_detector(config=None, size: int = 32):
    from clipfusion.config import load_preset
    from clipfusion.detector import CLIPFusion

    config = config or load_preset("tiny").replace(output_size=size)
    return CLIPFusion(config, clip=FakeBranch("clip", size), diffusion=FakeBranch("diffusion", size))
