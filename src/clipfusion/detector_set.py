"""Many fitted objects, one copy of the models: a production line's detectors by name.

    from clipfusion import DetectorSet

    line = DetectorSet.load({"bottle": "fitted/bottle", "cable": "fitted/cable"}, weights_dir="/data/w")
    results = line.predict("cable", ["photo.png"])      # or line["cable"].predict(...)

    line = DetectorSet.fit({"bottle": ["good/b0.png"], "cable": ["good/c0.png"]}, load_preset("paper"))
    line.save("fitted/")                                # fitted/bottle, fitted/cable

Each entry is an ordinary :class:`~clipfusion.CLIPFusion` whose branches are views of
:class:`~clipfusion.shared.SharedModels`: its own configuration, prompts, memory banks and thresholds, the
networks of every other entry that can share them. Its answers are those of the same fit loaded alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from clipfusion import fitted
from clipfusion.config import CLIPFusionConfig, load_preset
from clipfusion.data.images import ImageLike
from clipfusion.detector import AnomalyResult, CLIPFusion
from clipfusion.errors import ConfigError, InputError
from clipfusion.shared import SharedModels, plan_models


class DetectorSet(Mapping[str, CLIPFusion]):
    """Fitted objects by name (a :class:`~collections.abc.Mapping` of name → :class:`CLIPFusion`), on as few
    sets of models as their configurations allow (:func:`clipfusion.shared.plan_models`: usually one)."""

    def __init__(self, detectors: Mapping[str, CLIPFusion]) -> None:
        for name in detectors:
            if not fitted.NAME_PATTERN.match(name):
                raise ConfigError(f"{name!r} is not a usable detector name (letters, digits, '.', '_', '-')")
        self._detectors = dict(detectors)

    # -- the mapping ------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> CLIPFusion:
        try:
            return self._detectors[name]
        except KeyError:
            known = ", ".join(self._detectors) or "none"
            raise InputError(f"no fitted object named {name!r} (known: {known})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._detectors)

    def __len__(self) -> int:
        return len(self._detectors)

    @property
    def models(self) -> list[SharedModels]:
        """The distinct sets of models the entries use (one, unless configurations need others)."""
        seen: dict[int, SharedModels] = {}
        for detector in self._detectors.values():
            if detector.models is not None:
                seen.setdefault(id(detector.models), detector.models)
        return list(seen.values())

    # -- building ---------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        folders: Mapping[str, str | Path] | Iterable[str | Path],
        *,
        weights_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        device: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> DetectorSet:
        """Fitted folders (``{name: folder}``, or folders named after their last component, or ``NAME=DIR``
        strings) loaded onto shared models: each folder is read and checked before any model loads."""
        named = (
            {str(k): Path(v) for k, v in folders.items()}
            if isinstance(folders, Mapping)
            else fitted.parse_fitted(folders)
        )
        if not named:
            raise ConfigError("no fitted folder given")
        records = {name: fitted.read(path) for name, path in named.items()}
        configs = {
            name: record.config if device is None else record.config.replace(device=device)
            for name, record in records.items()
        }
        say = log or (lambda _message: None)
        detectors: dict[str, CLIPFusion] = {}
        plans = plan_models(configs)
        for index, (config, names) in enumerate(plans, start=1):
            which = f" (set {index} of {len(plans)})" if len(plans) > 1 else ""
            say(f"loading the models for {', '.join(names)}{which}")
            models = SharedModels(
                config, weights_dir=weights_dir, local_files_only=local_files_only, text_encoders=False
            )
            for name in names:
                detectors[name] = CLIPFusion.load(
                    records[name].path, local_files_only=local_files_only, device=device, models=models
                )
        return cls({name: detectors[name] for name in named})

    @classmethod
    def fit(
        cls,
        references: Mapping[str, Sequence[ImageLike]],
        config: CLIPFusionConfig | None = None,
        *,
        object_names: Mapping[str, str] | None = None,
        weights_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        log: Callable[[str], None] | None = None,
    ) -> DetectorSet:
        """Fit several objects on one load of the models: ``references`` maps each name to its normal
        reference images (empty: zero-shot); ``object_names`` the name a prompt uses, when it is not the
        name itself (``"metal_nut"`` → ``"metal nut"`` either way, through ``config.object_names``). Every
        prompt is encoded while the text encoders load alone, before the image models."""
        config = config or load_preset("paper")
        prompts = {name: (object_names or {}).get(name, name) for name in references}
        say = log or (lambda _message: None)
        say(f"loading the models for {len(prompts)} object(s)")
        models = SharedModels(
            config,
            weights_dir=weights_dir,
            local_files_only=local_files_only,
            objects=list(prompts.values()),
        )
        detectors: dict[str, CLIPFusion] = {}
        for name, images in references.items():
            regime = f"{len(images)}-shot" if len(images) else "zero-shot"
            say(f"fitting {name!r} ({regime})")
            detectors[name] = CLIPFusion(config, models=models).fit(prompts[name], images)
        return cls(detectors)

    # -- using ------------------------------------------------------------------------------------------
    def predict(
        self, name: str, images: Any, batch_size: int | None = None, progress: bool = False
    ) -> list[AnomalyResult]:
        """:meth:`CLIPFusion.predict` of the object ``name`` (no load, no copy: its branches are views)."""
        return self[name].predict(images, batch_size=batch_size, progress=progress)

    def save(self, root: str | Path) -> dict[str, Path]:
        """Each fitted object to ``root/<name>`` (:meth:`CLIPFusion.save`): one fitted folder per object,
        each loadable alone or with the others."""
        root = Path(root)
        return {name: detector.save(root / name) for name, detector in self._detectors.items()}

    def __repr__(self) -> str:
        return f"DetectorSet({', '.join(self._detectors)}; {len(self.models)} set(s) of models)"


__all__ = ["DetectorSet"]
