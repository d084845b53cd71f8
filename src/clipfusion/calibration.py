"""Thresholds from normal images alone: the decision rule a quality engineer can trust without defects.

Scores are not probabilities and their scale depends on the product, so the image threshold is the
``quantile`` of the scores of held-out normal images (about ``1 - quantile`` of normal images would be
flagged) and the pixel threshold the same quantile of the maxima of their maps (so that about the same
fraction of normal images, not of normal pixels, shows any masked pixel). The CLI's ``--calibrate`` calls
:func:`calibrate`; the :class:`~clipfusion.thresholds.Thresholds` it returns is saved with the configuration
it belongs to and refused for another one (:mod:`clipfusion.thresholds`, re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipfusion.errors import ConfigError, InputError
from clipfusion.thresholds import DEFAULT_QUANTILE, Thresholds, check_thresholds_for, reference_names

if TYPE_CHECKING:
    from clipfusion.data.images import ImageLike
    from clipfusion.detector import CLIPFusion


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
        references=reference_names(detector.references),
        config=detector.config.to_dict(),
    )


def _image_name(item: object, index: int) -> str:
    # paths absolute, as the references are recorded (one style in a thresholds file); in-memory images by
    # their position
    return reference_names([str(item)])[0] if isinstance(item, str | Path) else f"<image {index}>"


__all__ = ["DEFAULT_QUANTILE", "Thresholds", "calibrate", "check_thresholds_for", "thresholds_from_results"]
