"""``clipfusion evaluate``: the benchmark protocol on MVTec-AD, VisA or a folder of one's own."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipfusion.cli.options import (
    EXIT_OK,
    add_model_options,
    build_config,
    random_weights_banner,
    say,
    weights_dir,
)
from clipfusion.data.datasets import DATASET_KINDS


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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--save-maps",
        action="store_true",
        help="store every run's component maps at native resolution in OUT/maps/ (for `clipfusion sweep`)",
    )
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipfusion.evaluation import evaluate

    config = build_config(args)
    note = random_weights_banner(config)
    if note:
        say(note)
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
        log=say,
        note=f"**{note}**" if note else "",
        skip_bad=args.skip_bad,
        weights_dir=weights_dir(args),
        save_maps=args.save_maps,
    )
    print((out / "summary.md").read_text(encoding="utf-8"))
    say(f"results: {out / 'results.csv'}, {out / 'results.json'}, {out / 'summary.md'}")
    if args.save_maps:
        say(f"maps: {out / 'maps'} (`clipfusion sweep {out} --grid ...` re-evaluates the fusion options)")
    return EXIT_OK
