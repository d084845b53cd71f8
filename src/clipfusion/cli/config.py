"""``clipfusion config``: the effective configuration, printed or saved to edit and reuse, and what its
``auto`` placement resolves to on this machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipfusion.cli.options import EXIT_OK, add_model_options, build_config, say


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config", help="print the effective configuration (and what 'auto' resolves to), or save it"
    )
    p.add_argument("--save", type=Path, help="write it to this .json or .toml file")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipfusion.config import RESOLVED_KEY, save_config
    from clipfusion.outputs.folders import check_output_file

    if args.save:
        check_output_file(args.save, "--save")
    config = build_config(args)
    resolved = resolved_here(config)
    if args.save:
        # the file holds the options only ("auto" stays "auto"): it is for reuse, on this machine or another
        save_config(config, args.save)
        say(f"wrote {args.save}")
        say(f"on this machine: {json.dumps(resolved)}")
    else:
        print(json.dumps({**config.to_dict(), RESOLVED_KEY: resolved}, indent=2))
    return EXIT_OK


def resolved_here(config) -> dict:
    """The placement on this machine, or why there is none (a configuration written for a GPU machine can
    still be printed on a laptop)."""
    from clipfusion.errors import ConfigError
    from clipfusion.runtime import resolve_placement

    try:
        return resolve_placement(config)
    except ConfigError as exc:
        return {"unavailable": str(exc)}
