"""Component maps of an evaluation run, stored at their native resolution (``evaluate --save-maps``).

Storing what the branches computed, before the resize and the smoothing, lets every fusion option (α, σ,
the score rule, the terms) be re-evaluated exactly without a model (:mod:`clipfusion.evaluation.sweep`):
the stored maps go through the same :func:`clipfusion.fusion.fuse_components` as in the run. Native grids
keep the files small: 200 images of a run take a few MB.

**Format, version 1.** One NumPy ``.npz`` archive (deflate-compressed) per run (category, shots, seed),
``maps/<category>-<k>shot-seed<s>.npz`` in the output folder, readable with
``numpy.load(path, allow_pickle=False)``:

- ``format`` (str): ``"clipfusion-maps/1"``;
- ``config`` (str): the configuration that produced the maps, JSON as in ``results.json``;
- ``run`` (str): JSON with ``category``, ``shots``, ``seed``, ``dataset``, ``root``, ``references`` (as in
  ``results.json``) and ``output_size``;
- ``paths`` (str, N): the test images, relative to ``root`` when inside it; ``labels`` (int8, N): 1 anomalous,
  0 normal; ``defect_types`` (str, N): the defect folder (``good`` for normal images); ``mask_paths``
  (str, N): the ground-truth mask files (``""``: none);
- ``s_clip_L`` (float32, N): the global CLIP probability of "anomalous", when the CLIP branch ran;
- ``clip_L``, ``clip_V``, ``diff_L``, ``diff_V`` (float32, N × h × w): each component map on its own grid
  (15×15 CLIP tokens, or the crop / window grid; the diffusion attention or feature grid), before resize and
  smoothing; only the maps computed (zero-shot: no ``clip_V``, ``diff_V``);
- ``masks`` (uint8, N × S × ⌈S/8⌉): the ground-truth masks at the output size ``S`` as the metrics use them
  (nearest resize), ``numpy.packbits`` along the last axis; present when the run has pixel metrics.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipfusion.errors import InputError

FORMAT = "clipfusion-maps/1"
MAPS_DIR = "maps"
MAP_KEYS = ("clip_L", "clip_V", "diff_L", "diff_V")


def maps_file(out_dir: str | Path, category: str, shots: int, seed: int) -> Path:
    """Where the maps of one run live: ``<out_dir>/maps/<category>-<k>shot-seed<s>.npz``."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", category)
    return Path(out_dir) / MAPS_DIR / f"{safe}-{shots}shot-seed{seed}.npz"


def list_maps_files(run_dir: str | Path) -> list[Path]:
    folder = Path(run_dir) / MAPS_DIR
    return sorted(folder.glob("*.npz")) if folder.is_dir() else []


def clear_maps_files(out_dir: str | Path) -> None:
    """Remove the maps files of an earlier evaluation in ``out_dir`` (a fresh run replaces its results)."""
    for path in list_maps_files(out_dir):
        path.unlink(missing_ok=True)


def save_run_maps(
    path: str | Path,
    *,
    config: dict[str, Any],
    run: dict[str, Any],
    paths: Sequence[str],
    labels: Sequence[int],
    defect_types: Sequence[str],
    mask_paths: Sequence[str | None],
    components: dict[str, np.ndarray],
    s_clip_L: np.ndarray | None,
    masks: np.ndarray | None,
) -> Path:
    """Write one run's file atomically (see the module docstring for the format)."""
    from clipfusion.files import atomic_write_bytes

    n = len(paths)
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "config": np.array(json.dumps(config, sort_keys=True)),
        "run": np.array(json.dumps(run, sort_keys=True)),
        "paths": np.array([str(p) for p in paths], dtype=str).reshape(n),
        "labels": np.asarray(labels, dtype=np.int8).reshape(n),
        "defect_types": np.array([str(d) for d in defect_types], dtype=str).reshape(n),
        "mask_paths": np.array(["" if m is None else str(m) for m in mask_paths], dtype=str).reshape(n),
    }
    for name in MAP_KEYS:
        if name in components:
            value = np.ascontiguousarray(components[name], dtype=np.float32)
            if value.ndim != 3 or value.shape[0] != n:
                raise ValueError(f"{name}: expected ({n}, h, w) maps, got {value.shape}")
            arrays[name] = value
    if s_clip_L is not None:
        arrays["s_clip_L"] = np.asarray(s_clip_L, dtype=np.float32).reshape(n)
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        if masks.shape[0] != n or masks.ndim != 3:
            raise ValueError(f"masks: expected ({n}, S, S), got {masks.shape}")
        arrays["masks"] = np.packbits(masks, axis=-1)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


@dataclass
class RunMaps:
    """One stored run, read back: what the fusion and the metrics need, and where it came from."""

    path: Path
    config: dict[str, Any]
    run: dict[str, Any]
    paths: list[str]
    labels: np.ndarray
    defect_types: list[str]
    mask_paths: list[str]
    maps: dict[str, np.ndarray]
    s_clip_L: np.ndarray | None
    masks: np.ndarray | None  # (N, S, S) bool

    @property
    def category(self) -> str:
        return str(self.run["category"])

    @property
    def shots(self) -> int:
        return int(self.run["shots"])

    @property
    def seed(self) -> int:
        return int(self.run["seed"])

    def components(self) -> dict[str, Any]:
        """The maps and ``s_clip_L`` as float32 torch tensors, as the detector hands them to the fusion."""
        import torch

        out = {name: torch.from_numpy(value) for name, value in self.maps.items()}
        if self.s_clip_L is not None:
            out["s_clip_L"] = torch.from_numpy(self.s_clip_L)
        return out


def load_run_header(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, run)`` of a maps file without reading its arrays."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data.files or str(data["format"]) != FORMAT:
                raise InputError(f"{path}: not a {FORMAT} maps file")
            return json.loads(str(data["config"])), json.loads(str(data["run"]))
    except (OSError, ValueError, EOFError, KeyError) as exc:
        raise InputError(f"{path}: not a readable maps file ({exc})") from exc


def has_masks(path: str | Path) -> bool:
    """Whether a run's file holds ground-truth masks (so pixel metrics), without reading its arrays."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return "masks" in data.files
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable maps file ({exc})") from exc


def load_run_maps(path: str | Path) -> RunMaps:
    """Read one run's file; a file that is not one (or of another format version) is a clear error."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable maps file ({exc})") from exc
    if "format" not in arrays or str(arrays["format"]) != FORMAT:
        found = str(arrays["format"]) if "format" in arrays else "none"
        raise InputError(f"{path}: not a {FORMAT} maps file (format: {found})")
    try:
        config = json.loads(str(arrays["config"]))
        run = json.loads(str(arrays["run"]))
        labels = arrays["labels"].astype(np.int64)
        n = labels.shape[0]
        masks = None
        if "masks" in arrays:
            size = int(run["output_size"])
            masks = np.unpackbits(arrays["masks"], axis=-1, count=size).astype(bool)
        maps = {name: arrays[name] for name in MAP_KEYS if name in arrays}
        for name, value in maps.items():
            if value.dtype != np.float32 or value.ndim != 3 or value.shape[0] != n:
                raise ValueError(f"{name} has dtype {value.dtype} and shape {value.shape}")
        return RunMaps(
            path=path,
            config=config,
            run=run,
            paths=[str(p) for p in arrays["paths"]],
            labels=labels,
            defect_types=[str(d) for d in arrays["defect_types"]],
            mask_paths=[str(m) for m in arrays["mask_paths"]],
            maps=maps,
            s_clip_L=arrays.get("s_clip_L"),
            masks=masks,
        )
    except (KeyError, ValueError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: damaged maps file ({exc})") from exc


__all__ = [
    "FORMAT",
    "MAPS_DIR",
    "RunMaps",
    "clear_maps_files",
    "list_maps_files",
    "load_run_header",
    "load_run_maps",
    "maps_file",
    "save_run_maps",
]
