"""Thresholds from normal images alone: the decision rule a quality engineer can trust without defects.

Scores are not probabilities and their scale depends on the product, so the image threshold is the
``quantile`` of the scores of held-out normal images (about ``1 - quantile`` of normal images would be
flagged) and the pixel threshold the same quantile of the maxima of their maps (so that about the same
fraction of normal images, not of normal pixels, shows any masked pixel). The CLI's ``--calibrate`` calls
:func:`calibrate`; a :class:`Thresholds` is saved with the configuration it belongs to and refused for
another one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipfusion.errors import ConfigError, InputError

if TYPE_CHECKING:
    from clipfusion.detector import CLIPFusion, ImageLike

THRESHOLDS_FORMAT = 1
DEFAULT_QUANTILE = 0.99


@dataclass(frozen=True)
class Thresholds:
    """An image threshold (on scores) and a pixel threshold (on fused maps), and where they came from."""

    image: float
    pixel: float
    quantile: float = DEFAULT_QUANTILE
    n_images: int = 0
    files: tuple[str, ...] = ()
    object_name: str | None = None
    references: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"], data["references"] = list(self.files), list(self.references)
        return {"format": THRESHOLDS_FORMAT, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "thresholds") -> Thresholds:
        if not isinstance(data, dict) or data.get("format") != THRESHOLDS_FORMAT:
            raise InputError(f"{where}: not a clipfusion thresholds file (format {THRESHOLDS_FORMAT})")
        try:
            return cls(
                image=float(data["image"]),
                pixel=float(data["pixel"]),
                quantile=float(data.get("quantile", DEFAULT_QUANTILE)),
                n_images=int(data.get("n_images", 0)),
                files=tuple(str(f) for f in data.get("files", ())),
                object_name=data.get("object_name"),
                references=tuple(str(f) for f in data.get("references", ())),
                config=dict(data.get("config", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: malformed thresholds ({type(exc).__name__}: {exc})") from exc

    def save(self, path: str | Path) -> Path:
        from clipfusion.outputs.files import atomic_write_text

        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"{path}: cannot read thresholds ({exc.strerror or exc})") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, where=str(path))

    def check_config(self, config: dict[str, Any], where: str = "thresholds") -> None:
        """Refuse thresholds calibrated under another configuration: a score's scale belongs to the
        configuration that produced it."""
        if self.config and self.config != config:
            differing = sorted(_differences(self.config, config))
            raise ConfigError(
                f"{where}: calibrated for another configuration (differs in {', '.join(differing[:6])}"
                f"{' …' if len(differing) > 6 else ''}); calibrate again for this one"
            )


def check_thresholds_for(thresholds: Thresholds, detector: CLIPFusion, where: str = "thresholds") -> None:
    """Refuse thresholds made for another configuration, object or reference set: the scale of a score
    belongs to all three."""
    thresholds.check_config(detector.config.to_dict(), where)
    if thresholds.object_name is not None and thresholds.object_name != detector.object_name:
        raise ConfigError(
            f"{where}: calibrated for the object {thresholds.object_name!r}, not {detector.object_name!r}; "
            "calibrate again for this one"
        )
    if thresholds.config and tuple(thresholds.references) != _reference_names(detector.references):
        raise ConfigError(
            f"{where}: calibrated with other reference images ({len(thresholds.references)} given then, "
            f"{len(detector.references)} now); calibrate again with these references"
        )


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = set(a) | set(b)
    out = []
    for key in keys:
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            out += _differences(left, right, f"{prefix}{key}.")
        elif left != right:
            out.append(f"{prefix}{key}")
    return out


def thresholds_from_results(
    scores: Sequence[float], map_peaks: Sequence[float], quantile: float = DEFAULT_QUANTILE
) -> tuple[float, float]:
    """``(image threshold, pixel threshold)``: the ``quantile`` of the scores and of the map maxima."""
    if not 0.0 < quantile <= 1.0:
        raise ConfigError(f"quantile must lie in (0, 1], got {quantile}")
    if len(scores) == 0:
        raise InputError("calibration needs at least one normal image")
    image = float(np.quantile(np.asarray(scores, dtype=np.float64), quantile))
    return image, float(np.quantile(np.asarray(map_peaks, dtype=np.float64), quantile))


def calibrate(
    detector: CLIPFusion,
    normal_images: Sequence[ImageLike],
    quantile: float = DEFAULT_QUANTILE,
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> Thresholds:
    """Thresholds of a fitted detector from held-out normal images (not the references).

    The same thresholds ``clipfusion predict --calibrate`` sets; pass them to :meth:`Thresholds.save` to
    reuse them with ``predict --thresholds``.
    """
    from clipfusion.progress import progress_bar

    if not 0.0 < quantile <= 1.0:
        raise ConfigError(f"quantile must lie in (0, 1], got {quantile}")
    normal_images = list(normal_images)
    batch = batch_size or detector.default_batch_size
    scores: list[float] = []
    peaks: list[float] = []
    bar = progress_bar(len(normal_images), "calibrate", enabled=progress)
    for start in range(0, len(normal_images), batch):
        for result in detector.predict(normal_images[start : start + batch], batch_size=batch):
            scores.append(result.score)
            peaks.append(float(result.anomaly_map.max()))
        bar.update(min(batch, len(normal_images) - start))
    bar.close()
    image, pixel = thresholds_from_results(scores, peaks, quantile)
    return Thresholds(
        image=image,
        pixel=pixel,
        quantile=quantile,
        n_images=len(scores),
        files=tuple(_image_name(item, i) for i, item in enumerate(normal_images)),
        object_name=detector.object_name,
        references=_reference_names(detector.references),
        config=detector.config.to_dict(),
    )


def _reference_names(references: Sequence[str]) -> tuple[str, ...]:
    # absolute paths, so that the same files given from another working directory still match
    return tuple(r if r.startswith("<") else os.path.abspath(r) for r in references)


def _image_name(item: object, index: int) -> str:
    # paths are recorded as given; in-memory images by their position
    return str(item) if isinstance(item, str | Path) else f"<image {index}>"


__all__ = ["DEFAULT_QUANTILE", "Thresholds", "calibrate", "check_thresholds_for", "thresholds_from_results"]
