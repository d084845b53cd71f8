"""Where results come from: the package version, the software around it, and whether the weights are real.

Random-weight models (the ``tiny`` and ``random-full`` presets) exercise every code path, but their scores
and metrics say nothing about detection quality. Every output a person reads says so, and the words are
here, once each, so that a report, a server page and a results file never disagree about it:

- :data:`RANDOM_WEIGHTS_BANNER`: the warning a command prints and a page shows;
- :data:`WEIGHTS_NOTE`: the one-line label of an output file (PNG text chunks, manifests, reports, API
  answers);
- :data:`METRICS_NOTE`: what ``results.json`` records about the metrics of an evaluation;
- :data:`RANDOM_ABLATION_NOTE`: the head of every table of an ablation (sweep, grid);
- :data:`RANDOM_SPEED_NOTE`: beside speed and memory figures, which random weights measure faithfully;
- :data:`DEMO_FALLBACK_BANNER`: what the demo says when it falls back to random weights.

This module imports nothing: a configuration is asked only for its ``random_weights`` and ``preset``.
"""

from __future__ import annotations

from typing import Literal, Protocol

__version__ = "0.1.0"

WeightsKind = Literal["random", "pretrained"]

RANDOM_WEIGHTS_BANNER = (
    "PIPELINE DEMONSTRATION: random-weight models ({preset} preset). Scores and maps exercise the code path "
    "only; they say nothing about detection quality."
)
WEIGHTS_NOTE: dict[str, str] = {
    "random": "random weights: a pipeline demonstration; scores and maps say nothing about detection quality",
    "pretrained": "pretrained weights",
}
METRICS_NOTE: dict[str, str] = {
    "random": "random weights: a pipeline demonstration; these metrics say nothing about detection quality",
    "pretrained": "pretrained weights",
}
RANDOM_ABLATION_NOTE = (
    "Random-weight models: these numbers check the pipeline only; ablations over them say nothing about "
    "the method (use the pretrained weights)."
)
RANDOM_SPEED_NOTE = "random weights: speed and memory only"
#: what ``clipfusion demo`` says when it falls back to the tiny random models
DEMO_FALLBACK_BANNER = (
    "PIPELINE DEMONSTRATION with tiny random-weight models: the pretrained weights are not on this "
    "machine, so these scores and maps say nothing about detection quality."
)

#: the distributions whose versions a saved fit and a results file record
RECORDED_DISTRIBUTIONS = (
    "clipfusion",
    "torch",
    "torchvision",
    "open_clip_torch",
    "diffusers",
    "transformers",
    "safetensors",
    "numpy",
)


class Described(Protocol):
    """What provenance reads of a configuration (:class:`~clipfusion.config.CLIPFusionConfig`)."""

    @property
    def random_weights(self) -> bool: ...

    @property
    def preset(self) -> str: ...


def weights_kind(config: Described) -> WeightsKind:
    """``"random"`` when any branch in use has random weights (its scores demonstrate the pipeline only),
    else ``"pretrained"``: the one place that decides what every output file says about its weights."""
    return "random" if config.random_weights else "pretrained"


def random_weights_banner(config: Described) -> str:
    """The warning to print before showing a score or a metric of ``config``; empty for pretrained weights."""
    return RANDOM_WEIGHTS_BANNER.format(preset=config.preset) if config.random_weights else ""


def weights_record(config: Described) -> dict[str, str]:
    """What ``results.json`` says about the weights: metrics of random weights measure the pipeline only."""
    kind = weights_kind(config)
    return {"kind": kind, "note": METRICS_NOTE[kind]}


def software_versions() -> dict[str, str]:
    """Python, the platform and the versions of :data:`RECORDED_DISTRIBUTIONS` ("not installed" where
    absent): what a result needs beside it to be reproduced."""
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in RECORDED_DISTRIBUTIONS:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


__all__ = [
    "DEMO_FALLBACK_BANNER",
    "METRICS_NOTE",
    "RANDOM_ABLATION_NOTE",
    "RANDOM_SPEED_NOTE",
    "RANDOM_WEIGHTS_BANNER",
    "WEIGHTS_NOTE",
    "Described",
    "WeightsKind",
    "__version__",
    "random_weights_banner",
    "software_versions",
    "weights_kind",
    "weights_record",
]
