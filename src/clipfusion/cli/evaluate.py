"""``clipfusion evaluate``: the benchmark protocol on MVTec-AD, VisA or a folder of one's own."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clipfusion.cli.options import (
    EXIT_OK,
    add_model_options,
    build_config,
    say,
    show_progress,
    warn,
    weights_dir,
)
from clipfusion.config import CLIPFusionConfig
from clipfusion.data.datasets import DATASET_KINDS
from clipfusion.errors import ConfigError, InputError
from clipfusion.provenance import random_weights_banner


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="benchmark protocol on MVTec-AD, VisA or your own folder")
    p.add_argument("--dataset", required=True, choices=DATASET_KINDS)
    p.add_argument("--root", required=True, type=Path, help="data set root")
    p.add_argument("--category", nargs="+", help="categories (default: all)")
    p.add_argument("--shots", nargs="+", type=int, default=[0], help="k values, 0 = zero-shot (default: 0)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="reference-sampling seeds (default: 0)")
    p.add_argument("--out", type=Path, help="output folder (default: runs/<dataset>-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out, listing them")
    p.add_argument(
        "--save-maps",
        action="store_true",
        help="store every run's component maps at native resolution in OUT/maps/ (for `clipfusion sweep`)",
    )
    grid = p.add_argument_group("grid over options that change the diffusion maps")
    grid.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="diffusion.timestep, diffusion.feature_blocks, diffusion.attention_blocks or "
        "diffusion.state_words; a comma separates grid values, a plus sign joins the items of one list value "
        "(--grid diffusion.feature_blocks=up_blocks.0,up_blocks.1+up_blocks.2 is two points). Each point "
        "is stored as a run in OUT/<point>/ with its maps; OUT/table.md shows the grid",
    )
    grid.add_argument(
        "--latent-memory-mb",
        type=float,
        default=None,
        metavar="MB",
        help="VAE latents a grid keeps in memory before streaming them to files in OUT (default: 1024)",
    )
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipfusion.evaluation import evaluate

    config = build_config(args)
    if args.grid:
        return run_grid(args, config)
    if args.latent_memory_mb is not None:
        raise ConfigError("--latent-memory-mb applies to --grid runs only")
    out = _checked_out(args, args.out or Path("runs") / f"{args.dataset}-{config.preset}")
    note = random_weights_banner(config)
    if note:
        warn(note)
    evaluate(args.dataset, args.root, out, **_protocol_options(args, config, note), save_maps=args.save_maps)
    print((out / "summary.md").read_text(encoding="utf-8"))
    say(f"results: {out / 'results.csv'}, {out / 'results.json'}, {out / 'summary.md'}")
    if args.save_maps:
        say(f"maps: {out / 'maps'} (`clipfusion sweep {out} --grid ...` re-evaluates the fusion options)")
    return EXIT_OK


def _protocol_options(args: argparse.Namespace, config: CLIPFusionConfig, note: str) -> dict[str, Any]:
    """The keywords a plain evaluation and a grid take alike from the command line."""
    return dict(
        config=config,
        categories=args.category,
        shots=args.shots,
        seeds=args.seeds,
        resume=args.resume,
        batch_size=args.batch_size,
        progress=show_progress(args),
        log=say,
        note=f"**{note}**" if note else "",
        skip_bad=args.skip_bad,
        weights_dir=weights_dir(args),
    )


def _checked_out(args: argparse.Namespace, out: Path) -> Path:
    from clipfusion.outputs.folders import check_creatable, check_input_folder

    # what Ctrl-C says: every finished run is saved as it finishes
    args.on_interrupt = lambda: f"every finished run is saved in {out}; add --resume to continue it"
    check_input_folder(args.root, "--root")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out names an existing file; give a folder")
    check_creatable(out, "--out")
    return out


def run_grid(args: argparse.Namespace, config: CLIPFusionConfig) -> int:
    from clipfusion.evaluation.grid import DEFAULT_LATENT_MEMORY_MB, evaluate_grid
    from clipfusion.evaluation.gridspec import FUSION_OPTIONS, MAP_OPTIONS, parse_grid

    grid = parse_grid(
        args.grid,
        MAP_OPTIONS,
        other=f"fusion options ({', '.join(FUSION_OPTIONS)}) are swept from stored maps: `clipfusion sweep`",
    )
    out = _checked_out(args, args.out or Path("runs") / f"{args.dataset}-{config.preset}-grid")
    note = random_weights_banner(config)
    if note:
        warn(note)
    result = evaluate_grid(
        args.dataset,
        args.root,
        out,
        grid=grid,
        **_protocol_options(args, config, note),
        latent_memory_mb=DEFAULT_LATENT_MEMORY_MB if args.latent_memory_mb is None else args.latent_memory_mb,
    )
    print((out / "table.md").read_text(encoding="utf-8"))
    if result.model_seconds:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in result.model_seconds.items())
        say(f"model time: {parts}; images through the VAE {result.counts.get('vae_images', 0)}")
    say(
        f"{len(result.points)} grid points in {out}/<point>/ (each an evaluation with maps/); "
        f"table: {out / 'table.md'}"
    )
    return EXIT_OK
