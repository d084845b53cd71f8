"""``clipfusion config``: the effective configuration, printed or saved to edit and reuse."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipfusion.cli.options import EXIT_OK, add_model_options, build_config, say


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the effective configuration, or save it with --save")
    p.add_argument("--save", type=Path, help="write it to this .json or .toml file")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipfusion.config import save_config
    from clipfusion.outputs.folders import check_output_file

    if args.save:
        check_output_file(args.save, "--save")
    config = build_config(args)
    if args.save:
        save_config(config, args.save)
        say(f"wrote {args.save}")
    else:
        print(json.dumps(config.to_dict(), indent=2))
    return EXIT_OK
