"""The ``clipfusion`` command: evaluate, predict, demo, config.

Expected failures (bad files, bad options, missing weights) print one line per problem and exit with
status 2; ``--debug`` shows the traceback instead. Interrupting with Ctrl-C exits with 130 and leaves only
complete output files behind (every file is written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipfusion import __version__
from clipfusion.config import PRESETS, CLIPFusionConfig, load_config, load_preset, with_overrides
from clipfusion.errors import ClipfusionError, ConfigError, InputError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
RANDOM_WEIGHTS_BANNER = (
    "PIPELINE DEMONSTRATION: random-weight models ({preset} preset). Scores and maps exercise the code path "
    "only; they say nothing about detection quality."
)


def _err(message: str) -> None:
    for line in str(message).splitlines() or [""]:
        print(f"clipfusion: error: {line}", file=sys.stderr)


# -- options shared by the commands --


def _parse_value(text: str) -> Any:
    """``--set key=value`` values: JSON when it parses (numbers, booleans, lists), otherwise a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: paper)")
    group.add_argument("--config", type=Path, help="a configuration saved as .json or .toml")
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any option, e.g. --set alpha_map=0.3 --set clip.patch_mode=crops",
    )
    group.add_argument("--device", help="cpu, cuda, cuda:1 … (default: auto)")
    group.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="model precision")
    group.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    group.add_argument("--weights", type=Path, help="a weights directory (see `clipfusion weights`)")


def build_config(args: argparse.Namespace) -> CLIPFusionConfig:
    if args.config and args.preset:
        raise ConfigError("give either --preset or --config, not both")
    config = load_config(args.config) if args.config else load_preset(args.preset or "paper")
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = _parse_value(value.strip())
    for branch in ("clip", "diffusion"):
        if args.device:
            overrides[f"{branch}.device"] = args.device
        if args.dtype:
            overrides[f"{branch}.dtype"] = args.dtype
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    config = with_overrides(config, overrides) if overrides else config
    if args.weights is not None:
        os.environ["CLIPFUSION_WEIGHTS"] = str(args.weights)
    return config


def is_random_weights(config: CLIPFusionConfig) -> bool:
    return config.clip.pretrained == "random" or config.diffusion.weights == "random"


# -- evaluate --


def cmd_evaluate(args: argparse.Namespace) -> int:
    from clipfusion.evaluation import evaluate

    config = build_config(args)
    note = RANDOM_WEIGHTS_BANNER.format(preset=config.preset) if is_random_weights(config) else ""
    if note:
        print(note, file=sys.stderr)
    out = args.out or Path("runs") / f"{args.dataset}-{config.preset}"
    evaluate(
        args.dataset,
        args.root,
        out,
        config=config,
        categories=args.category,
        shots=args.shots,
        seeds=args.seeds,
        resume=args.resume,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        log=lambda msg: print(msg, file=sys.stderr),
        note=f"**{note}**" if note else "",
        skip_bad=args.skip_bad,
    )
    print((out / "summary.md").read_text(encoding="utf-8"))
    print(f"results: {out / 'results.csv'}, {out / 'results.json'}, {out / 'summary.md'}", file=sys.stderr)
    return EXIT_OK


# -- predict --

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def collect_images(inputs: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Files as given and the image files under folders (recursively, sorted); problems listed, not raised."""
    files: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(
                p
                for p in item.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            )
            if not found:
                problems.append(f"{item}: folder contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            problems.append(f"{item}: no such file or folder")
    return files, problems


def check_images(files: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Decode every image once before any model work, so all problems are reported together."""
    from clipfusion.data.images import MIN_SIDE, load_image

    good, problems = [], []
    for path in files:
        try:
            load_image(path, min_side=MIN_SIDE)
            good.append(path)
        except InputError as exc:
            problems.append(str(exc))
    return good, problems


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from clipfusion import report
    from clipfusion.detector import CLIPFusion
    from clipfusion.inference import write_predictions

    if args.quantile is not None and not 0.0 < args.quantile <= 1.0:
        raise ConfigError(f"--quantile must lie in (0, 1], got {args.quantile}")
    if args.normalize not in report.NORMALISATIONS:
        raise ConfigError(f"--normalize must be one of {', '.join(report.NORMALISATIONS)}")
    config = build_config(args)
    files, problems = collect_images(args.images)
    refs, ref_problems = collect_images(args.refs) if args.refs else ([], [])
    calib, calib_problems = collect_images([args.calibrate]) if args.calibrate else ([], [])
    problems += ref_problems + calib_problems
    files, bad = check_images(files)
    refs, bad_refs = check_images(refs)
    calib, bad_calib = check_images(calib)
    skipped = bad + bad_refs + bad_calib
    if problems or (skipped and not args.skip_bad):
        for line in problems + skipped:
            _err(line)
        if skipped and not problems:
            print("clipfusion: use --skip-bad to continue without the unreadable images", file=sys.stderr)
        return EXIT_USAGE
    if not files:
        _err("no readable input image")
        return EXIT_USAGE
    for line in skipped:
        print(f"clipfusion: skipped: {line}", file=sys.stderr)

    banner = RANDOM_WEIGHTS_BANNER.format(preset=config.preset) if is_random_weights(config) else ""
    if banner:
        print(banner, file=sys.stderr)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    detector = CLIPFusion(config)
    detector.fit(args.object, refs).release_text_encoders()
    progress = not args.no_progress

    threshold, pixel_threshold = args.threshold, args.pixel_threshold
    if calib:
        calib_results = detector.predict(calib, batch_size=args.batch_size, progress=progress)
        q = args.quantile if args.quantile is not None else 0.99
        calib_scores = np.array([r.score for r in calib_results])
        # the pixel threshold is the same quantile of each normal image's map maximum, so that about the
        # same fraction of normal images (not of normal pixels) shows any masked pixel
        calib_peaks = np.array([float(r.anomaly_map.max()) for r in calib_results])
        if threshold is None:
            threshold = float(np.quantile(calib_scores, q))
        if pixel_threshold is None:
            pixel_threshold = float(np.quantile(calib_peaks, q))
        print(
            f"calibrated on {len(calib)} normal images (quantile {q}): threshold {threshold:.6f}, "
            f"pixel threshold {pixel_threshold:.6f}",
            file=sys.stderr,
        )

    details = {
        "object": args.object,
        "references": f"{len(refs)} ({'zero-shot' if not refs else 'few-shot'})",
        "preset": config.preset,
    }
    if skipped:
        details["skipped (unreadable)"] = "; ".join(skipped)
    write_predictions(
        detector,
        files,
        out,
        threshold=threshold,
        pixel_threshold=pixel_threshold,
        normalize=args.normalize,
        batch_size=args.batch_size,
        progress=progress,
        title=f"clipfusion: {args.object}",
        banner=banner,
        details=details,
    )
    print(
        f"wrote {out / 'scores.csv'}, {out / 'report.html'}, overlays and maps for {len(files)} images",
        file=sys.stderr,
    )
    return EXIT_OK


# -- config --


def cmd_config(args: argparse.Namespace) -> int:
    from clipfusion.config import save_config

    config = build_config(args)
    if args.save:
        save_config(config, args.save)
        print(f"wrote {args.save}", file=sys.stderr)
    else:
        print(json.dumps(config.to_dict(), indent=2))
    return EXIT_OK


# -- weights --


def cmd_weights(args: argparse.Namespace) -> int:
    from clipfusion.models import weights

    if args.action == "verify":
        problems = weights.verify(args.folder)
        for line in problems:
            _err(line)
        if problems:
            return EXIT_USAGE
        manifest = weights.read_manifest(args.folder) or {}
        total = sum(f["size"] for f in manifest.get("files", []))
        print(f"{args.folder}: {len(manifest.get('files', []))} files, {total / 1e9:.2f} GB, all intact")
        return EXIT_OK
    config = build_config(args)
    if args.action == "where":
        print("\n".join(weights.describe(config, args.weights)))
        return EXIT_OK
    sources = weights.sources_for(
        config, clip_repo=args.clip_repo, clip_revision=args.clip_revision, variant=args.variant
    )
    if args.sd_repo or args.sd_revision:
        from dataclasses import replace

        sd = sources[1]
        sources[1] = replace(sd, repo_id=args.sd_repo or sd.repo_id, revision=args.sd_revision or sd.revision)
    print(f"fetching into {args.to}:", file=sys.stderr)
    for source in sources:
        print(f"  {source.component}: {source.repo_id}@{source.revision}", file=sys.stderr)
    manifest = weights.fetch(args.to, sources, log=lambda m: print(m, file=sys.stderr))
    total = sum(f["size"] for f in manifest["files"])
    print(f"done: {len(manifest['files'])} files, {total / 1e9:.2f} GB; use it with --weights {args.to}")
    return EXIT_OK


# -- parser --


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipfusion",
        description="Training-free zero-/few-shot anomaly detection (CLIPFusion: CLIP meets diffusion).",
    )
    parser.add_argument("--version", action="version", version=f"clipfusion {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("evaluate", help="benchmark protocol on MVTec-AD, VisA or your own folder")
    p.add_argument("--dataset", required=True, choices=("mvtec", "visa", "folder"))
    p.add_argument("--root", required=True, type=Path, help="data set root")
    p.add_argument("--category", nargs="+", help="categories (default: all)")
    p.add_argument("--shots", nargs="+", type=int, default=[0], help="k values, 0 = zero-shot (default: 0)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="reference-sampling seeds (default: 0)")
    p.add_argument("--out", type=Path, help="output folder (default: runs/<dataset>-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out, listing them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="score your images; write scores, heat maps and an HTML report")
    p.add_argument("images", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--object", required=True, help='what the product is, e.g. "metal nut"')
    p.add_argument("--refs", nargs="+", type=Path, help="normal reference images or folders (few-shot)")
    p.add_argument("--out", type=Path, default=Path("clipfusion-out"), help="output folder")
    p.add_argument("--threshold", type=float, help="image score above which an image is anomalous")
    p.add_argument("--pixel-threshold", type=float, help="map value above which a pixel is anomalous (masks)")
    p.add_argument(
        "--calibrate",
        type=Path,
        help="folder of held-out NORMAL images: sets the thresholds to the --quantile of their scores",
    )
    p.add_argument("--quantile", type=float, help="calibration quantile (default 0.99)")
    p.add_argument("--normalize", default="set", help="heat-map scale: 'set' (shared) or 'image'")
    p.add_argument("--skip-bad", action="store_true", help="continue past unreadable images, listing them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="synthetic data, zero- and few-shot, HTML report — in minutes")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    p.add_argument("--weights", type=Path, help="a weights directory with the pretrained models")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=lambda a: __import__("clipfusion.demo", fromlist=["run"]).run(a))

    p = sub.add_parser("weights", help="fetch, verify or locate the pretrained weights (offline use)")
    wsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    w = wsub.add_parser(
        "fetch", help="download everything the preset needs into one folder (connected machine)"
    )
    w.add_argument("--to", required=True, type=Path, help="the weights folder to create or complete")
    w.add_argument("--variant", help="weight variant, e.g. fp16 (half the download for the SD components)")
    w.add_argument("--clip-repo", help="hub repository of the OpenCLIP weights (default: open_clip's own)")
    w.add_argument("--clip-revision", default="main", help="revision of the OpenCLIP repository")
    w.add_argument("--sd-repo", help="hub repository of SD-2-inpainting (default: the configuration's)")
    w.add_argument("--sd-revision", help="revision of the SD-2-inpainting repository")
    add_model_options(w)
    w.set_defaults(func=cmd_weights)
    w = wsub.add_parser("verify", help="check a weights folder against its manifest")
    w.add_argument("folder", type=Path)
    w.set_defaults(func=cmd_weights)
    w = wsub.add_parser("where", help="say which weights would be used, and from where")
    add_model_options(w)
    w.set_defaults(func=cmd_weights)

    # `clipfusion bench ARGS` is handed whole to the benchmark's own parser (see main)
    sub.add_parser(
        "bench", help="speed and memory benchmark against anomalib WinCLIP (benchmarks/RESULTS.md)"
    )

    p = sub.add_parser("config", help="print the effective configuration, or save it with --save")
    p.add_argument("--save", type=Path, help="write it to this .json or .toml file")
    add_model_options(p)
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from clipfusion import bench

        return bench.main(argv[1:], prog="clipfusion bench")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or EXIT_OK)
    except ClipfusionError as exc:
        if args.debug:
            traceback.print_exc()
        _err(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted; files written so far are complete (use --resume to continue an evaluation)")
        return EXIT_INTERRUPTED
    except MemoryError:
        _err("out of memory; try a smaller --batch-size or --dtype bfloat16")
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
