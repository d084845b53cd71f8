"""One copy of the models for many fitted objects.

A production line inspects many products, and what makes one product's detector different from another's
is small: its text features and prompt embeddings, its memory banks, its thresholds (a fitted folder, a few
MB). The networks — the CLIP image tower, the VAE encoder, the UNet — are the same frozen weights for every
product. :class:`SharedModels` loads them once; each fitted object is a :class:`~clipfusion.CLIPFusion` whose
branches are *views* of them (:meth:`PatchCLIP.share`, :meth:`MapDiff.share`): its own configuration,
prompts and memory banks on the very same modules, so switching product costs no load and no copy.

What the models are, and so what several fitted objects must agree on to share them (:func:`models_key`):
the weights (architecture, checkpoint or seed), where they run and in which dtype (``auto`` resolved on this
machine), the VAE's memory layout and compilation, and, where the UNet's conditioning is precomputed, the
timestep. Everything else — fusion options, prompts, state words, blocks read, image and output sizes, batch
sizes — stays each object's own. The UNet's surgery (what the early exit never reaches) is decided for the
union of what the objects read (:func:`shared_config`).

A shared UNet is never specialised to one object: its prompt projections are not replaced by tables of one
object's prompts (:mod:`clipfusion.branches.mapdiff.conditioning`), and each object's maps are still the
numbers its own single-object detector computes. Its passes take a lock (the capture hooks live on the
shared modules), so objects served from several threads never mix their passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipfusion.config import CLIPFusionConfig, load_preset, with_overrides
from clipfusion.errors import ConfigError

if TYPE_CHECKING:
    from clipfusion.branches import Branch

#: the options of a branch that decide its networks (weights, placement, layout) rather than what is
#: computed with them
MODEL_OPTIONS = {
    "clip": ("model", "weights", "checkpoint", "init_seed"),
    "diffusion": ("model", "revision", "architecture", "weights", "init_seed", "channels_last", "compile"),
}


def models_key(config: CLIPFusionConfig) -> tuple[Any, ...]:
    """What decides the networks of a configuration on this machine: two configurations with the same key
    can share one :class:`SharedModels`; any other pair needs two."""
    from clipfusion.runtime import resolve_placement

    placement = resolve_placement(config)
    clip, diffusion = config.branch_configs()
    key: list[Any] = []
    for name, section, used in (
        ("clip", clip, config.use_clip),
        ("diffusion", diffusion, config.use_diffusion),
    ):
        if not used:
            key.append((name, None))
            continue
        fields = tuple((option, getattr(section, option)) for option in MODEL_OPTIONS[name])
        where = (placement[name]["device"], placement[name]["dtype"])
        if name == "diffusion" and diffusion.precompute_conditioning:
            fields += (("precomputed timestep", diffusion.timestep),)
        key.append((name, where, fields))
    return tuple(key)


def models_difference(a: CLIPFusionConfig, b: CLIPFusionConfig) -> str | None:
    """``None`` when the two configurations can share models, else a short phrase saying what differs."""
    key_a, key_b = models_key(a), models_key(b)
    for (name, *left), (_, *right) in zip(key_a, key_b, strict=True):
        if left == right:
            continue
        if not left or left[0] is None or not right or right[0] is None:
            return f"the {name} branch is used by one and not the other"
        if left[0] != right[0]:
            return f"{name} runs on {right[0][0]} in {right[0][1]}, not {left[0][0]} in {left[0][1]}"
        differing = [o for (o, x), (_, y) in zip(left[1], right[1], strict=True) if x != y]
        return f"{name} {', '.join(differing)} differ"
    return None


def shared_config(
    configs: Sequence[CLIPFusionConfig], base: CLIPFusionConfig | None = None
) -> CLIPFusionConfig:
    """The configuration one set of models is built with for several configurations: ``base`` (default the
    first), with the union of every configuration's feature and attention blocks (in their order), so that
    the early exit's surgery keeps every block any of them reads, and the whole UNet when one of them runs
    without the early exit. Configurations at another timestep than ``base`` need the UNet's timestep layers
    themselves, not their outputs at one timestep (``precompute_conditioning`` off).

    What :func:`plan_models` builds shared models with, and what ``evaluate --grid`` builds its one detector
    with for every grid point.
    """
    if not configs:
        raise ConfigError("no configuration to build shared models for")
    base = configs[0] if base is None else base
    diffusion = [c.diffusion for c in configs]
    feature = tuple(dict.fromkeys(b for d in diffusion for b in d.feature_blocks))
    attention = tuple(dict.fromkeys(b for d in diffusion for b in d.attention_blocks))
    one_timestep = all(d.timestep == base.diffusion.timestep for d in diffusion)
    return base.replace(
        **{
            "diffusion.feature_blocks": feature,
            "diffusion.attention_blocks": attention,
            "diffusion.early_exit": all(d.early_exit for d in diffusion),
            "diffusion.precompute_conditioning": base.diffusion.precompute_conditioning and one_timestep,
            "use_clip": any(c.use_clip for c in configs),
            "use_diffusion": any(c.use_diffusion for c in configs),
        }
    )


def plan_models(configs: Mapping[str, CLIPFusionConfig]) -> list[tuple[CLIPFusionConfig, list[str]]]:
    """Fitted objects by name → the sets of models they need: ``[(configuration to build, names)]``, one
    entry per distinct :func:`models_key`, in the order the names first appear."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, config in configs.items():
        groups.setdefault(models_key(config), []).append(name)
    return [(shared_config([configs[n] for n in names]), names) for names in groups.values()]


def load_branches(
    config: CLIPFusionConfig,
    *,
    weights_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    text_encoders: bool = True,
    objects: Sequence[str] = (),
    shared: bool = False,
    clip: Branch | None = None,
    diffusion: Branch | None = None,
) -> tuple[Branch | None, Branch | None]:
    """The branches ``config`` uses, loaded with the weights of ``weights_dir`` (else the Hugging Face
    cache) unless given ready-made; ``objects`` have their prompts encoded while the text encoders load
    alone. ``shared`` loads them for many fitted objects (a UNet never specialised to one object's
    prompts)."""
    import logging
    import time

    from clipfusion.models.weights import apply_weights_dir

    log = logging.getLogger("clipfusion.detector")
    # the weights folder replaces hub ids by local paths for loading only; the configuration keeps the
    # portable names that results record
    clip_config, diffusion_config = apply_weights_dir(config, weights_dir).branch_configs()
    if clip is None and config.use_clip:
        from clipfusion.branches.patchclip import PatchCLIP

        start = time.perf_counter()
        clip = PatchCLIP.from_config(
            clip_config, local_files_only=local_files_only, text_encoder=text_encoders, objects=objects
        )
        log.debug("CLIP branch %s loaded in %.1f s", clip_config.model, time.perf_counter() - start)
    if diffusion is None and config.use_diffusion:
        from clipfusion.branches.mapdiff import MapDiff

        start = time.perf_counter()
        diffusion = MapDiff.from_config(
            diffusion_config,
            local_files_only=local_files_only,
            text_encoder=text_encoders,
            objects=objects,
            shared=shared,
        )
        took = time.perf_counter() - start
        log.debug("diffusion branch %s loaded in %.1f s", diffusion_config.architecture, took)
    return clip, diffusion


class SharedModels:
    """The networks of a configuration, loaded once, for any number of fitted objects.

    ``CLIPFusion.load(folder, models=models)`` and ``CLIPFusion(config, models=models)`` build a detector for
    one object on them; :class:`~clipfusion.detector_set.DetectorSet` holds many. ``objects`` (names known
    before loading) get their prompts encoded while the text encoders load alone, which are freed before the
    image models load; ``text_encoders=False`` never loads them (for fitted folders, whose prompts are
    saved); otherwise they stay until :meth:`release_text_encoders`, so that new objects can be fitted.
    """

    def __init__(
        self,
        config: CLIPFusionConfig | None = None,
        *,
        weights_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        objects: Iterable[str] = (),
        text_encoders: bool = True,
    ) -> None:
        from clipfusion.data import object_name
        from clipfusion.runtime import map_large_blocks, return_freed_memory

        self.config = config or load_preset("paper")
        self.weights_dir = Path(weights_dir).expanduser() if weights_dir is not None else None
        names = list(dict.fromkeys(object_name(o, self.config.object_names) for o in objects))
        if names and not text_encoders:
            raise ConfigError("objects need the text encoders: their prompts are encoded while loading")
        map_large_blocks()  # before any weight exists (see runtime.map_large_blocks)
        self.clip, self.diffusion = load_branches(
            self.config,
            weights_dir=self.weights_dir,
            local_files_only=local_files_only,
            text_encoders=text_encoders,
            objects=names,
            shared=True,
        )
        return_freed_memory()
        self.key = models_key(self.config)

    @classmethod
    def from_preset(
        cls, name: str = "paper", *, weights_dir: str | Path | None = None, **overrides: Any
    ) -> SharedModels:
        """A preset's models, options overridden as for :meth:`CLIPFusion.from_preset`."""
        config = load_preset(name)
        if overrides:
            config = with_overrides(config, {k.replace("__", "."): v for k, v in overrides.items()})
        return cls(config, weights_dir=weights_dir)

    def branches(self, config: CLIPFusionConfig) -> tuple[Branch | None, Branch | None]:
        """Branches for one fitted object with ``config``, on these networks (its own prompts, memory banks
        and options; nothing copied, nothing loaded). A configuration that needs other networks is refused
        with one line saying what differs."""
        difference = models_difference(self.config, config)
        if difference is not None:
            raise ConfigError(f"these shared models cannot serve this configuration: {difference}")
        clip_config, diffusion_config = config.branch_configs()
        clip = self.clip.share(clip_config) if config.use_clip and self.clip is not None else None
        diffusion = None
        if config.use_diffusion and self.diffusion is not None:
            diffusion = self.diffusion.share(diffusion_config)
        return clip, diffusion

    def release_text_encoders(self) -> SharedModels:
        """Free both text encoders for every object at once (objects fitted or loaded keep their prompts;
        no new object can be fitted afterwards)."""
        from clipfusion.runtime import return_freed_memory

        for branch in (self.clip, self.diffusion):
            if branch is not None:
                branch.release_text_encoder()
        return_freed_memory()
        return self

    def parameters_count(self) -> int:
        """Parameters held by the shared networks (each counted once)."""
        seen: set[int] = set()
        total = 0
        for module in self.modules():
            for parameter in module.parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    total += parameter.numel()
        return total

    def modules(self) -> list[Any]:
        """The shared networks (for counting, moving or inspecting them)."""
        out: list[Any] = []
        if self.clip is not None:
            out.append(self.clip.model)  # type: ignore[attr-defined]
        if self.diffusion is not None:
            out += [self.diffusion.vae, self.diffusion.unet]  # type: ignore[attr-defined]
        return out

    def __repr__(self) -> str:
        return f"SharedModels(preset={self.config.preset!r}, {len(self.modules())} networks)"


__all__ = [
    "MODEL_OPTIONS",
    "SharedModels",
    "load_branches",
    "models_difference",
    "models_key",
    "plan_models",
    "shared_config",
]
