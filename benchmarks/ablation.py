"""Each optimisation of the diffusion branch switched off (or, for the opt-in ones, on) in turn.

Every variant is a detector of its own, built as another branch object on the same modules
(:func:`benchmarks.common.twin_detector`) with its own configuration; where an optimisation lives in a
module's state rather than in the configuration (the memory format and activations of the VAE), the variant
gets its own copy of that module (the VAE encoder: 34 M parameters). The one exception is the attention
kernel, a processor installed on the UNet's and VAE's layers: :class:`ClassicAttention` installs diffusers'
classic processor for the duration of its own calls only, as the branch's attention capture does for its
layers. The detector is loaded with ``diffusion.early_exit=false`` so that the variant without the early
exit has the whole UNet; the early exit's time does not depend on the unreached blocks being present.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from benchmarks.common import OBJECT, build_detector, detector_overrides, twin_detector
from benchmarks.faithfulness import pearson
from benchmarks.timing import CpuMonitor, median, time_interleaved

#: (name, what it changes) in the order they are timed; "default" is the shipped configuration
VARIANTS = (
    (
        "default",
        "as shipped: UNet early exit at the last layer a map reads, channels-last VAE with in-place "
        "activations, SDPA on every uncaptured attention layer",
    ),
    ("no early exit", "the UNet runs to its last layer (`diffusion.early_exit=false`)"),
    (
        "no channels-last",
        "the VAE convolves in NCHW (`diffusion.channels_last=false`, a contiguous VAE copy)",
    ),
    ("out-of-place activations", "the VAE's SiLU allocates a new tensor each time (a VAE copy)"),
    ("no SDPA", "diffusers' classic attention (explicit softmax) on every attention layer of UNet and VAE"),
    ("compiled VAE", "`torch.compile` of the VAE encoder (`diffusion.compile=true`); compile time apart"),
)


@contextlib.contextmanager
def classic_attention(*modules: Any) -> Iterator[None]:
    """diffusers' ``AttnProcessor`` on every attention layer of ``modules``, their own restored after."""
    from diffusers.models.attention_processor import AttnProcessor

    saved = [(module, module.attn_processors) for module in modules]
    try:
        for module in modules:
            module.set_attn_processor(AttnProcessor())
        yield
    finally:
        for module, processors in saved:
            module.set_attn_processor(processors)


class ClassicAttention:
    """A diffusion branch (:class:`~clipfusion.branches.Branch`) that runs another one with diffusers'
    classic attention processor on its UNet and VAE during its own calls."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name, self.map_names = inner.name, inner.map_names

    @property
    def default_batch_size(self) -> int:
        return self.inner.default_batch_size

    @property
    def shots(self) -> int:
        return self.inner.shots

    def fit(self, object_name: str, images: Any = None) -> ClassicAttention:
        with classic_attention(self.inner.unet, self.inner.vae):
            self.inner.fit(object_name, images)
        return self

    def prepare(self, object_names: Any) -> None:
        self.inner.prepare(object_names)

    def predict(
        self, images: Any, *, batch_size: int | None = None, native: bool = False
    ) -> dict[str, torch.Tensor]:
        with classic_attention(self.inner.unet, self.inner.vae):
            return self.inner.predict(images, batch_size=batch_size, native=native)

    def release_text_encoder(self) -> None:
        self.inner.release_text_encoder()

    # the fitted state is the inner branch's: the attention processor changes no weight and no state
    def state(self) -> Any:
        return self.inner.state()

    def load_state(self, state: Any) -> None:
        self.inner.load_state(state)

    def weights_fingerprint(self) -> str:
        return self.inner.weights_fingerprint()


def _vae_copy(vae: Any, *, contiguous: bool = False, inplace: bool = True) -> Any:
    vae = copy.deepcopy(vae)
    if contiguous:
        vae.to(memory_format=torch.contiguous_format)
    for module in vae.encoder.modules():
        if isinstance(module, torch.nn.SiLU):
            module.inplace = inplace
    return vae


def build_variants(det: Any, names: list[str]) -> dict[str, Any]:
    """One detector per variant, on ``det``'s modules (loaded with ``early_exit=false``)."""
    from clipfusion.branches.mapdiff import MapDiff

    d = det.diffusion
    early = {"diffusion.early_exit": True}

    def mapdiff(vae: Any) -> Callable[[Any], Any]:
        return lambda config: MapDiff(vae, d.unet, d.text_encoder, d.tokenizer, d.scheduler, config)

    def classic(config: Any) -> Any:
        return ClassicAttention(MapDiff(d.vae, d.unet, d.text_encoder, d.tokenizer, d.scheduler, config))

    builders: dict[str, Callable[[], Any]] = {
        "default": lambda: twin_detector(det, **early),
        "no early exit": lambda: det,
        "no channels-last": lambda: twin_detector(
            det,
            diffusion_factory=mapdiff(_vae_copy(d.vae, contiguous=True)),
            **early,
            **{"diffusion.channels_last": False},
        ),
        "out-of-place activations": lambda: twin_detector(
            det, diffusion_factory=mapdiff(_vae_copy(d.vae, inplace=False)), **early
        ),
        "no SDPA": lambda: twin_detector(det, diffusion_factory=classic, **early),
        "compiled VAE": lambda: twin_detector(det, **early, **{"diffusion.compile": True}),
    }
    return {name: builders[name]() for name in names}


def ablation_section(
    preset: str,
    device: str,
    overrides: dict[str, Any],
    dtype: str | None,
    references: list[Any],
    queries: list[Any],
    *,
    repeats: int,
    compile_variant: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """1-shot latency at batch 1 of every variant, interleaved round by round on the same query.

    Every variant's outputs on the first (warm-up) round are compared with the default's: an optimisation
    must not change what is computed. The compiled variant compiles during its fit; its compile time is
    its fit time less the default's.
    """
    det = build_detector(
        preset, detector_overrides(device, {**overrides, "diffusion.early_exit": False}, dtype)
    )
    if det.diffusion is None:
        raise RuntimeError("the ablation needs the diffusion branch (use_diffusion=true)")
    names = [name for name, _ in VARIANTS]
    if not compile_variant or det.config.diffusion.compile:
        names.remove("compiled VAE")
    detectors = build_variants(det, names)
    fit_s = {}
    for name, variant in detectors.items():
        start = time.perf_counter()
        variant.fit(OBJECT, references[:1])
        fit_s[name] = time.perf_counter() - start
    for variant in detectors.values():  # all prompts are cached; the shared text encoders can go
        variant.release_text_encoders()
    first: dict[str, Any] = {}  # each variant's result in the warm-up round

    def call(name: str, i: int) -> None:
        result = detectors[name].predict([queries[i % len(queries)]], batch_size=1)[0]
        first.setdefault(name, result)

    log(f"ablation: {', '.join(names)}")
    with CpuMonitor() as monitor:
        times = time_interleaved(
            {name: functools.partial(call, name) for name in names}, warmup=1, repeats=repeats, device=device
        )
    default = first["default"]
    rows = {}
    for name in names:
        result = first[name]
        rows[name] = {
            "median_s": median(times[name]),
            "times_s": times[name],
            "fit_s": fit_s[name],
            "map_max_abs_diff": float(np.abs(result.anomaly_map - default.anomaly_map).max()),
            "map_pearson": pearson(result.anomaly_map, default.anomaly_map),
            "score_abs_diff": abs(float(result.score) - float(default.score)),
        }
        log(f"ablation {name}: {rows[name]['median_s'] * 1e3:.0f} ms")
    if "compiled VAE" in rows:
        rows["compiled VAE"]["compile_s"] = max(0.0, fit_s["compiled VAE"] - fit_s["default"])
    from benchmarks.common import branch_dtypes

    return {
        "dtype": branch_dtypes(det).get("diffusion"),
        "shots": 1,
        "repeats": repeats,
        "variants": rows,
        "load": monitor.result,
    }
