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
from dataclasses import dataclass, field, replace
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


#: where a thresholds value came from, as ``thresholds.json`` says it
CALIBRATION, BY_HAND = "calibration", "set by hand"
_VALUES = ("image", "pixel")


@dataclass(frozen=True)
class Thresholds:
    """An image threshold (on scores) and a pixel threshold (on fused maps), and where they came from.

    Calibrated values (:func:`clipfusion.calibration.calibrate`) carry their calibration: ``quantile``,
    ``n_images`` and ``files``. Values set by hand (a slider of the inspector page, ``--threshold``) name
    themselves in ``by_hand`` and keep, in ``calibrated``, the calibrated ``(image, pixel)`` they replaced
    (``quantile``, ``n_images`` and ``files`` then describe that calibration), or None when there was none:
    a thresholds file never claims a calibration that did not produce its values.
    """

    image: float
    pixel: float
    quantile: float | None = DEFAULT_QUANTILE
    n_images: int = 0
    files: tuple[str, ...] = ()
    object_name: str | None = None
    references: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    #: the values set by hand ("image", "pixel"); empty: both come from the calibration
    by_hand: tuple[str, ...] = ()
    #: the calibrated (image, pixel) that values set by hand replaced; None: no calibration behind them
    calibrated: tuple[float, float] | None = None

    @property
    def origin(self) -> str:
        """``"calibration"`` or ``"set by hand"`` (some value at least)."""
        return BY_HAND if self.by_hand else CALIBRATION

    @classmethod
    def hand_set(cls, image: float, pixel: float, fit: FittedView) -> Thresholds:
        """Thresholds set by hand for a fit that has no calibration: no quantile, no calibration images."""
        return cls(
            image=float(image),
            pixel=float(pixel),
            quantile=None,
            n_images=0,
            object_name=fit.object_name,
            references=reference_names(fit.references),
            config=fit.config.to_dict(),
            by_hand=_VALUES,
        )

    def calibration(self) -> Thresholds | None:
        """The calibrated thresholds behind these (themselves when nothing was set by hand), or None."""
        if not self.by_hand:
            return self
        if self.calibrated is None:
            return None
        return replace(self, image=self.calibrated[0], pixel=self.calibrated[1], by_hand=(), calibrated=None)

    def with_values(self, image: float, pixel: float) -> Thresholds:
        """These thresholds with ``image`` and ``pixel`` instead: a value that differs from the calibrated
        one is recorded as set by hand, beside the calibrated values; one left as calibrated stays exactly
        that (moving one slider never changes the other value). The calibrated values themselves give back
        the calibration."""
        image, pixel = float(image), float(pixel)
        base = self.calibration()
        if base is None:
            return replace(self, image=image, pixel=pixel, by_hand=_VALUES, calibrated=None)
        hand = tuple(
            n
            for n, new, old in zip(_VALUES, (image, pixel), (base.image, base.pixel), strict=True)
            if new != old
        )
        if not hand:
            return base
        return replace(base, image=image, pixel=pixel, by_hand=hand, calibrated=(base.image, base.pixel))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": THRESHOLDS_FORMAT, "image": self.image, "pixel": self.pixel}
        calibration = {"quantile": self.quantile, "n_images": self.n_images, "files": list(self.files)}
        if not self.by_hand:
            data.update(origin=CALIBRATION, **calibration)
        else:
            data.update(origin=BY_HAND, set_by_hand=list(self.by_hand), set_from=None)
            if self.calibrated is not None:
                data["set_from"] = {"image": self.calibrated[0], "pixel": self.calibrated[1], **calibration}
        data.update(object_name=self.object_name, references=list(self.references), config=self.config)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "thresholds") -> Thresholds:
        if not isinstance(data, dict) or data.get("format") != THRESHOLDS_FORMAT:
            raise InputError(f"{where}: not a clipfusion thresholds file (format {THRESHOLDS_FORMAT})")
        try:
            origin = data.get("origin")
            legacy = origin is None  # written before thresholds said where their values came from
            if legacy:
                origin = CALIBRATION if int(data.get("n_images", 0)) > 0 else BY_HAND
            if origin not in (CALIBRATION, BY_HAND):
                raise ValueError(f"origin {origin!r} is neither {CALIBRATION!r} nor {BY_HAND!r}")
            by_hand: tuple[str, ...] = ()
            calibrated = None
            source: dict[str, Any] | None = data
            if origin == BY_HAND:
                by_hand = tuple(str(v) for v in data.get("set_by_hand", _VALUES))
                if not by_hand or not set(by_hand) <= set(_VALUES):
                    raise ValueError(f"set_by_hand must list image and/or pixel, got {list(by_hand)}")
                source = None if legacy else data.get("set_from")
                if source is not None:
                    calibrated = (float(source["image"]), float(source["pixel"]))
            quantile = source.get("quantile", DEFAULT_QUANTILE) if source is not None else None
            return cls(
                image=float(data["image"]),
                pixel=float(data["pixel"]),
                quantile=None if quantile is None else float(quantile),
                n_images=int(source.get("n_images", 0)) if source is not None else 0,
                files=tuple(str(f) for f in source.get("files", ())) if source is not None else (),
                object_name=data.get("object_name"),
                references=tuple(str(f) for f in data.get("references", ())),
                config=dict(data.get("config", {})),
                by_hand=by_hand,
                calibrated=calibrated,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
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
    "BY_HAND",
    "CALIBRATION",
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
