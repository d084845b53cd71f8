"""``clipfusion bench``: how fast and how large your configuration is on your machine.

Builds the detector the model options describe, fits it on k reference images, then measures the load and
fit times, the latency of each stage and of a whole image at batch 1, images per second at
``--batch-size``, the peak memory, and what ``dtype = "auto"`` resolved to. Images: yours (``--images``) or
generated ones (512 px, the synthetic data set's). The comparison with anomalib's WinCLIP is the
repository's ``benchmarks/bench_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from clipfusion.cli.options import (
    EXIT_OK,
    EXIT_USAGE,
    add_model_options,
    build_config,
    err,
    say,
    weights_dir,
)
from clipfusion.errors import ConfigError
from clipfusion.provenance import RANDOM_SPEED_NOTE, random_weights_banner


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time and memory of your configuration on this machine")
    p.add_argument("--images", nargs="+", type=Path, help="images or folders to time on (default: generated)")
    p.add_argument(
        "--shots", type=int, default=1, help="reference images to fit on (default 1; 0: zero-shot)"
    )
    p.add_argument("--object", default="bottle cap", help="object name for the prompts (default: bottle cap)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement (default 3)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipfusion.cli.config import resolved_here
    from clipfusion.detector import CLIPFusion
    from clipfusion.files import atomic_write_text
    from clipfusion.outputs.folders import check_output_file
    from clipfusion.runtime import cpu_features
    from clipfusion.speed import measure

    if args.shots < 0 or args.repeats < 1:
        raise ConfigError("--shots must be >= 0 and --repeats >= 1")
    if args.json:  # checked before minutes of measuring, not when the figures are written
        check_output_file(args.json, "--json")
    config = build_config(args)
    banner = random_weights_banner(config)
    if banner:
        say(banner)
    images = _images(args)
    if len(images) < args.shots + 1:
        err(f"--images gives {len(images)} image(s); --shots {args.shots} needs at least {args.shots + 1}")
        return EXIT_USAGE
    references, queries = images[: args.shots], images[args.shots :]

    resolved = resolved_here(config)
    say(f"placement: {json.dumps(resolved)}")
    start = time.perf_counter()
    # as `clipfusion predict` loads: prompts encoded and text encoders freed before the image models
    detector = CLIPFusion(config, weights_dir=weights_dir(args), objects=[args.object])
    load_s = time.perf_counter() - start
    say(f"loaded in {load_s:.1f} s")
    start = time.perf_counter()
    detector.fit(args.object, references)
    fit_s = time.perf_counter() - start
    batch = args.batch_size or detector.default_batch_size
    figures = measure(
        detector, queries, batch_size=batch, repeats=args.repeats, progress=lambda m: say(f"  {m}")
    )
    report: dict[str, Any] = {
        "preset": config.preset,
        "random_weights": config.random_weights,
        "cpu": cpu_features()["name"],
        "resolved": detector.resolved,
        "load_s": load_s,
        "fit_s": fit_s,
        "shots": args.shots,
        **figures,
    }
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        say(f"wrote {args.json}")
    return EXIT_OK


def _images(args: argparse.Namespace) -> list[Any]:
    from clipfusion.data import load_image

    if args.images:
        from clipfusion.data.checks import collect_images

        files, problems = collect_images(args.images)
        if problems:
            raise ConfigError("; ".join(problems))
        return [load_image(path) for path in files]
    from clipfusion.data import make_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="clipfusion-bench-") as tmp:
        root = make_synthetic_dataset(tmp, categories=["bottle_cap"], n_train=4, n_test=4, image_size=512)
        files = sorted((Path(root) / "bottle_cap").rglob("*.png"))
        return [load_image(path) for path in files]


def format_report(r: dict[str, Any]) -> str:
    placement = ", ".join(
        f"{name} {r['resolved'][name]['dtype']} on {r['resolved'][name]['device']}"
        for name in ("clip", "diffusion")
        if name in r["resolved"]
    )
    lines = [
        f"clipfusion bench: preset {r['preset']}"
        + (f" ({RANDOM_SPEED_NOTE})" if r["random_weights"] else ""),
        f"  machine: {r['cpu'] or 'CPU'}; {placement}",
    ]
    if "auto_dtype" in r["resolved"]:
        lines.append(f"  dtype auto: {r['resolved']['auto_dtype']}")
    lines += [
        f"  load {r['load_s']:.1f} s, fit on {r['shots']} reference(s) {r['fit_s']:.1f} s",
        f"  per stage, batch 1 (median of {r['repeats']}):",
    ]
    lines += [f"    {stage:<26} {seconds * 1e3:>10,.1f} ms" for stage, seconds in r["stages_s"].items()]
    lines += [
        f"  per image, batch 1:          {r['latency_s'] * 1e3:>10,.1f} ms",
        f"  images/s at batch {r['batch_size']}:        {r['images_per_s']:>10.3f}",
    ]
    if r.get("peak_rss_gb") is not None:
        # per batch size: the throughput batch's activations are batch_size times those of one image
        during = f"{r['peak_rss_gb']:.2f} GB during inference up to batch {r['batch_size']}"
        if r.get("peak_rss_batch1_gb") is not None and r["batch_size"] != 1:
            during = f"{r['peak_rss_batch1_gb']:.2f} GB during inference at batch 1, {during}"
        lines.append(
            f"  peak memory (resident): {during}, "
            f"{max(r['peak_rss_gb'], r['peak_rss_before_gb']):.2f} GB whole life"
        )
    if r.get("peak_vram_gb") is not None:
        lines.append(f"  peak VRAM (allocated): {r['peak_vram_gb']:.2f} GB")
    return "\n".join(lines)
