"""Decision thresholds: the value a fit carries, the rule that turns a score into a decision, and the check
that thresholds belong to the detector they are used with.

Scores are not probabilities and their scale depends on the configuration, the object and the references,
so a :class:`Thresholds` records all three beside its two values and is refused for any other fit. How the
values are found from normal images is :mod:`clipfusion.calibration`; here is only what every user of
thresholds shares (the detector, a fitted folder, a prediction run, the server, the Ray engine), so none
of them needs the calibration procedure, or the detector, to read or apply them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from clipfusion.errors import ConfigError, InputError
from clipfusion.files import atomic_write_text, read_json

if TYPE_CHECKING:
    import numpy as np

THRESHOLDS_FORMAT = 1
DEFAULT_QUANTILE = 0.99

Decision = Literal["anomalous", "normal"]


def decide(score: float, threshold: float) -> Decision:
    """The image-level rule: anomalous when the score is strictly above the threshold."""
    return "anomalous" if score > threshold else "normal"


def pixel_mask(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """The pixel-level rule: the anomalous pixels are those whose fused value is strictly above the pixel
    threshold (same scale as the map)."""
    return anomaly_map > threshold


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

    def to_json(self) -> str:
        """The text of a ``thresholds.json`` (what :meth:`save` writes, and a fitted folder holds)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        path = Path(path)
        return cls.from_dict(read_json(path, "thresholds file"), where=str(path))

    def check_config(self, config: dict[str, Any], where: str = "thresholds") -> None:
        """Refuse thresholds calibrated under another configuration: a score's scale belongs to the
        configuration that produced it."""
        if self.config and self.config != config:
            differing = sorted(_differences(self.config, config))
            raise ConfigError(
                f"{where}: calibrated for another configuration (differs in {', '.join(differing[:6])}"
                f"{' …' if len(differing) > 6 else ''}); calibrate again for this one"
            )


class _Configuration(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


class FittedView(Protocol):
    """What the compatibility check reads of a fit: a detector, or a fitted folder read without models."""

    @property
    def config(self) -> _Configuration: ...

    @property
    def object_name(self) -> str | None: ...

    @property
    def references(self) -> Sequence[str]: ...


def check_thresholds_for(thresholds: Thresholds, fit: FittedView, where: str = "thresholds") -> None:
    """Refuse thresholds made for another configuration, object or reference set: the scale of a score
    belongs to all three."""
    thresholds.check_config(fit.config.to_dict(), where)
    if thresholds.object_name is not None and thresholds.object_name != fit.object_name:
        raise ConfigError(
            f"{where}: calibrated for the object {thresholds.object_name!r}, not {fit.object_name!r}; "
            "calibrate again for this one"
        )
    if thresholds.config and tuple(thresholds.references) != reference_names(fit.references):
        raise ConfigError(
            f"{where}: calibrated with other reference images ({len(thresholds.references)} given then, "
            f"{len(fit.references)} now); calibrate again with these references"
        )


def reference_names(references: Sequence[str]) -> tuple[str, ...]:
    """References as thresholds record them: absolute paths, so that the same files given from another
    working directory still match; in-memory images (``<image 0>``) as they are."""
    return tuple(r if r.startswith("<") else os.path.abspath(r) for r in references)


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


__all__ = [
    "DEFAULT_QUANTILE",
    "THRESHOLDS_FORMAT",
    "Decision",
    "FittedView",
    "Thresholds",
    "check_thresholds_for",
    "decide",
    "pixel_mask",
    "reference_names",
]
