"""What every section shares: the synthetic inputs, building detectors, and twins of a built detector
(other branch objects on the same modules, so that variants cost no second copy of the weights)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

CATEGORY = "bottle_cap"  # synthetic category the inputs come from
OBJECT = "bottle cap"  # the object name both detectors are given
GB = 1e9
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "auto": "auto"}


def short(dtype: str) -> str:
    return SHORT_DTYPE.get(dtype, dtype)


def regime(shots: int) -> str:
    return "zero-shot" if shots == 0 else f"{shots}-shot"


def make_inputs(root: Path, *, n_references: int, n_queries: int, size: int) -> Path:
    """Synthetic MVTec-layout images of one category (normal train images as references, test images as
    queries): deterministic, offline, written once per run and read by every process of the run."""
    from clipfusion.data import make_synthetic_dataset

    return make_synthetic_dataset(
        root, categories=[CATEGORY], n_train=max(1, n_references), n_test=max(2, n_queries), image_size=size
    )


def load_inputs(root: Path) -> tuple[list[Any], list[Any]]:
    """(references, queries) as decoded RGB PIL images, so that no timed call reads a file."""
    from PIL import Image

    def read(folder: Path) -> list[Any]:
        images = []
        for path in sorted(folder.rglob("*.png")):
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        return images

    base = Path(root) / CATEGORY
    return read(base / "train"), read(base / "test")


def cycle(items: Sequence[Any], n: int) -> list[Any]:
    return [items[i % len(items)] for i in range(n)]


def detector_overrides(device: str, overrides: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    """Keyword overrides for ``CLIPFusion.from_preset``: the device, the dtype (``None``: the preset's) and
    the user's ``--set`` options (dotted names become double underscores)."""
    out = {key.replace(".", "__"): value for key, value in overrides.items()}
    out.update(device=device)
    if dtype is not None:
        out.update(dtype=dtype)
    return out


def build_detector(preset: str, overrides: dict[str, Any], objects: list[str] | None = None) -> Any:
    """``objects``: names whose prompts are encoded while loading, text encoders freed before the image
    models load (as the command line builds); None keeps the text encoders."""
    from clipfusion.detector import CLIPFusion

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CLIPFusion.from_preset(preset, objects=objects, **overrides)


def branch_dtypes(det: Any) -> dict[str, str]:
    """``{"clip": "float32", "diffusion": "float32"}``: what each branch actually computes in."""
    from clipfusion.runtime import dtype_name

    return {
        branch.name: dtype_name(branch.dtype)
        for branch in det.branches
        if isinstance(getattr(branch, "dtype", None), torch.dtype)
    }


def dtype_label(det: Any) -> str:
    """``fp32`` or ``clip bf16 / diffusion fp32``: what the detector actually runs in."""
    names = branch_dtypes(det)
    if len(set(names.values())) == 1:
        return short(next(iter(names.values())))
    return " / ".join(f"{name} {short(dtype)}" for name, dtype in names.items())


def twin_detector(det: Any, *, diffusion_factory: Any | None = None, **options: Any) -> Any:
    """Another detector on the modules of ``det``: new branch objects (their own configuration, caches and
    memory banks) wrapping the same weights. ``options`` change the configuration (dotted keys reach into a
    branch: ``**{"diffusion.early_exit": True}``, or ``dtype="auto"`` where auto resolves to ``det``'s
    dtype); ``diffusion_factory(diffusion_config)`` builds the diffusion branch instead (an ablation variant
    with its own copy of a module). Needs the text encoders: build twins before releasing them."""
    from clipfusion.branches.mapdiff import MapDiff
    from clipfusion.branches.patchclip import PatchCLIP
    from clipfusion.detector import CLIPFusion
    from clipfusion.runtime import resolve_placement

    config = det.config.replace(**options) if options else det.config
    placement = resolve_placement(config)
    for branch in det.branches:  # a branch built on another's modules casts them in place: refuse that
        if branch.name in placement and placement[branch.name]["dtype"] != branch_dtypes(det)[branch.name]:
            raise ValueError(
                f"a twin in {placement[branch.name]['dtype']} cannot share the {branch.name} branch's "
                f"{branch_dtypes(det)[branch.name]} weights"
            )
    clip_config, diffusion_config = config.branch_configs()
    clip = PatchCLIP(det.clip.model, det.clip.tokenizer, clip_config) if det.clip is not None else None
    diffusion = None
    if diffusion_factory is not None:
        diffusion = diffusion_factory(diffusion_config)
    elif det.diffusion is not None:
        d = det.diffusion
        diffusion = MapDiff(d.vae, d.unet, d.text_encoder, d.tokenizer, d.scheduler, diffusion_config)
    return CLIPFusion(config, clip=clip, diffusion=diffusion)
