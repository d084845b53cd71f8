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
    show_progress,
    warn,
    weights_dir,
)
from clipfusion.data.datasets import DATASET_KINDS
from clipfusion.errors import InputError


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
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipfusion.evaluation import evaluate
    from clipfusion.outputs.folders import check_creatable, check_input_folder

    config = build_config(args)
    check_input_folder(args.root, "--root")
    out = args.out or Path("runs") / f"{args.dataset}-{config.preset}"
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out names an existing file; give a folder")
    check_creatable(out, "--out")
    note = random_weights_banner(config)
    if note:
        warn(note)
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
        progress=show_progress(args),
        log=say,
        note=f"**{note}**" if note else "",
        skip_bad=args.skip_bad,
        weights_dir=weights_dir(args),
    )
    print((out / "summary.md").read_text(encoding="utf-8"))
    say(f"results: {out / 'results.csv'}, {out / 'results.json'}, {out / 'summary.md'}")
    return EXIT_OK
