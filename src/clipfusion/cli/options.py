"""What the commands share: the model options, the weights folder, the random-weights banner, error lines.

This is the only place that reads ``CLIPFUSION_WEIGHTS``: the library takes the weights folder as an explicit
``weights_dir`` and never looks at (or writes) the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from clipfusion.config import (
    PRESETS,
    CLIPFusionConfig,
    load_config,
    load_preset,
    parse_overrides,
    with_overrides,
)
from clipfusion.errors import ConfigError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
WEIGHTS_ENV = "CLIPFUSION_WEIGHTS"
RANDOM_WEIGHTS_BANNER = (
    "PIPELINE DEMONSTRATION: random-weight models ({preset} preset). Scores and maps exercise the code path "
    "only; they say nothing about detection quality."
)


def err(message: str) -> None:
    """Print a user-facing error, one ``clipfusion: error:`` line per line of the message."""
    for line in str(message).splitlines() or [""]:
        print(f"clipfusion: error: {line}", file=sys.stderr)


def say(message: str) -> None:
    """A status line on stderr (stdout is kept for results)."""
    print(message, file=sys.stderr, flush=True)


def add_weights_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights-dir",
        "--weights",
        dest="weights_dir",
        type=Path,
        metavar="DIR",
        help=f"a weights folder made by `clipfusion weights fetch` (default: ${WEIGHTS_ENV})",
    )


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
    group.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="model precision (default auto: bfloat16 on CPUs with AMX, float16 or bfloat16 on CUDA, "
        "else float32)",
    )
    group.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    add_weights_option(group)


def build_config(args: argparse.Namespace) -> CLIPFusionConfig:
    """The configuration the model options describe: a preset or a file, then ``--set``, then the
    placement options (``--device`` / ``--dtype`` apply to both branches)."""
    if args.config and args.preset:
        raise ConfigError("give either --preset or --config, not both")
    config = load_config(args.config) if args.config else load_preset(args.preset or "paper")
    overrides = parse_overrides(args.overrides)
    if args.device:
        overrides["device"] = args.device
    if args.dtype:
        overrides["dtype"] = args.dtype
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    return with_overrides(config, overrides) if overrides else config


def weights_dir(args: argparse.Namespace) -> Path | None:
    """``--weights-dir``, else ``$CLIPFUSION_WEIGHTS``, else None (the Hugging Face cache)."""
    given = getattr(args, "weights_dir", None)
    if given is not None:
        return Path(given).expanduser()
    value = os.environ.get(WEIGHTS_ENV, "").strip()
    return Path(value).expanduser() if value else None


def weights_origin(args: argparse.Namespace) -> str:
    return "--weights-dir" if getattr(args, "weights_dir", None) is not None else WEIGHTS_ENV


def random_weights_banner(config: CLIPFusionConfig) -> str:
    return RANDOM_WEIGHTS_BANNER.format(preset=config.preset) if config.random_weights else ""
