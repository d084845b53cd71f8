"""``clipfusion demo``: a synthetic data set, zero- and few-shot detection, a summary table and an HTML
report, in a couple of minutes on two CPU cores and with no network.

With the pretrained weights available locally (hub cache, or ``--weights-dir DIR``) it runs the ``paper``
preset; it never downloads anything. Without them it says so loudly and runs the ``tiny`` random-weight
preset, and every output is labelled as a pipeline demonstration whose scores do not reflect detection
quality.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clipfusion.cli.options import add_weights_option, say, show_progress, warn, weights_dir
from clipfusion.config import load_preset
from clipfusion.errors import WeightsUnavailableError
from clipfusion.provenance import DEMO_FALLBACK_BANNER

DEMO_CATEGORIES = ("woven_fabric", "bottle_cap")


def _loud(text: str) -> None:
    bar = "!" * 100
    warn(bar)
    for line in text.splitlines():
        warn(f"!! {line}")
    warn(bar)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic data, zero- and few-shot, HTML report — in minutes")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    add_weights_option(p)
    p.set_defaults(func=run)


def load_detector(weights: Path | None):
    """The paper detector when its weights are on this machine, else the tiny random one (and why)."""
    from clipfusion.detector import CLIPFusion

    # the demo never downloads: a demo that pulls gigabytes on first run is not a demo
    try:
        return CLIPFusion(load_preset("paper"), weights_dir=weights, local_files_only=True), None
    except WeightsUnavailableError as exc:
        return CLIPFusion(load_preset("tiny")), str(exc)


def run(args: argparse.Namespace) -> int:
    from clipfusion.data import SYNTHETIC_CATEGORIES, FolderDataset, make_synthetic_dataset, sample_references
    from clipfusion.evaluation import evaluate
    from clipfusion.outputs.folders import OutputFolder
    from clipfusion.outputs.predictions import write_predictions

    out: Path = args.out
    progress = show_progress(args)
    started = time.perf_counter()
    categories = [c for c in DEMO_CATEGORIES if c in SYNTHETIC_CATEGORIES] or list(SYNTHETIC_CATEGORIES[:2])
    data = out / "data"
    say(f"1/4 writing a synthetic data set ({', '.join(categories)}) to {data}")
    make_synthetic_dataset(data, categories=categories, n_train=4, n_test=10, image_size=128, seed=0)

    say("2/4 loading models")
    detector, why = load_detector(weights_dir(args))
    banner = ""
    if why is not None:
        banner = DEMO_FALLBACK_BANNER
        _loud(
            f"{banner}\nWhy: {why}\n"
            "To use the real models: `clipfusion weights fetch --to DIR` on a connected machine,\n"
            "then `clipfusion demo --weights-dir DIR` (or set CLIPFUSION_WEIGHTS=DIR)."
        )
    config = detector.config

    say("3/4 evaluating zero-shot and 2-shot on the synthetic categories")
    evaluate(
        "folder",
        data,
        out / "evaluation",
        config=config,
        categories=categories,
        shots=(0, 2),
        seeds=(0,),
        progress=progress,
        detector_factory=lambda _cfg: detector,
        log=say,
        note=f"**{banner}**" if banner else "",
    )

    category = categories[-1]
    say(f"4/4 writing the HTML report for {category!r} (2-shot)")
    train, test = FolderDataset(data / category, "train"), FolderDataset(data / category, "test")
    refs = sample_references(list(train), 2, seed=0)
    detector.fit(category, [r.image_path for r in refs])
    write_predictions(
        detector,
        [s.image_path for s in test],
        OutputFolder(out / "report", overwrite=True),  # a demo run replaces the previous demo
        progress=progress,
        title=f"clipfusion demo: {category} (2-shot)",
        banner=banner,
        details={"preset": config.preset, "references": ", ".join(r.image_path.name for r in refs)},
        labels=[s.defect_type for s in test],
    )
    summary = (out / "evaluation" / "summary.md").read_text(encoding="utf-8")
    print(summary)
    say(f"done in {time.perf_counter() - started:.0f} s")
    say(f"  summary table: {out / 'evaluation' / 'summary.md'}")
    say(f"  HTML report:   {out / 'report' / 'report.html'}")
    if banner:
        _loud(banner)
    return 0
