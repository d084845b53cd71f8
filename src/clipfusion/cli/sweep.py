"""``clipfusion sweep``: fusion options re-evaluated from the maps a run stored, without loading a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipfusion.cli.options import EXIT_OK, say, show_progress
from clipfusion.evaluation.results import METRIC_COLUMNS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="re-evaluate fusion options (α, σ, score rule, terms) from the maps of `evaluate --save-maps`",
        description=(
            "Recompute the fusion and every metric for each point of a grid of fusion options, from the "
            "component maps a run stored with `clipfusion evaluate --save-maps`; no model is loaded. "
            "Grid syntax: --grid KEY=V1,V2,... (a comma separates values; for terms a plus sign joins the "
            "maps of one value, 'all' is all four). Several --grid options make their product."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the --out folder of `evaluate --save-maps`")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="alpha_map, alpha_score, sigma, score_mode or terms, e.g. --grid alpha_map=0,0.25,0.5 "
        "--grid terms=clip_L+diff_L,clip_L+clip_V,all",
    )
    p.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/sweep)")
    p.add_argument(
        "--best-by",
        default="image_auroc",
        choices=METRIC_COLUMNS,
        help="metric that picks the starred best point and the slices plotted (default: image_auroc)",
    )
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipfusion.evaluation.gridspec import FUSION_OPTIONS, grid_points, parse_grid
    from clipfusion.evaluation.sweep import sweep

    grid = parse_grid(
        args.grid, FUSION_OPTIONS, other="options that change the maps: `clipfusion evaluate --grid`"
    )
    result = sweep(
        args.run_dir,
        grid,
        out_dir=args.out,
        best_by=args.best_by,
        plots=not args.no_plots,
        progress=show_progress(args),
        log=say,
    )
    print((result.out_dir / "sweep.md").read_text(encoding="utf-8"))
    n_runs = len({(r["category"], r["shots"], r["seed"]) for r in result.rows}) if result.rows else 0
    say(f"{len(grid_points(grid))} grid points × {n_runs} runs in {result.seconds:.1f} s")
    say("written: " + ", ".join(str(p) for p in result.files))
    return EXIT_OK
