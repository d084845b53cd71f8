"""The ``clipfusion`` command: one module per subcommand (``predict.py``, ``fit.py``, ``evaluate.py``,
``serve.py``, ``sweep.py``, ``demo.py``, ``weights.py``, ``config.py``, ``bench.py``), options they share in
``options.py``.

Expected failures (bad files, bad options, missing weights) print one line per problem and exit with
status 2; ``--debug`` shows the traceback instead. Interrupting with Ctrl-C exits with 130, leaves only
complete output files behind (every file is written atomically) and says in one line where it stopped, what
was done and how to go on (a command sets ``args.on_interrupt`` to say the last two).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from clipfusion.cli import bench, config, demo, evaluate, fit, predict, serve, sweep, weights
from clipfusion.cli.options import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    WEIGHTS_HINT,
    add_common_options,
    configure_logging,
    err,
    last_status,
)
from clipfusion.errors import ClipfusionError, WeightsUnavailableError
from clipfusion.provenance import __version__

#: the subcommands, in the order ``clipfusion --help`` lists them; each module has ``register(subparsers)``
COMMANDS = (evaluate, sweep, predict, fit, serve, demo, weights, config, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipfusion",
        description="Training-free zero-/few-shot anomaly detection (CLIPFusion: CLIP meets diffusion).",
    )
    parser.add_argument("--version", action="version", version=f"clipfusion {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    for leaf in _leaf_parsers(parser):
        add_common_options(leaf)
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser that runs a command (``predict``, ``weights fetch`` …), not the groups above them."""
    leaves = []
    for action in parser._actions:  # argparse has no public listing of its subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                leaves += _leaf_parsers(child) or [child]
    return leaves


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        configure_logging(args)
        return int(args.func(args) or EXIT_OK)
    except WeightsUnavailableError as exc:
        if args.debug:
            traceback.print_exc()
        err(str(exc))
        err(WEIGHTS_HINT)
        return EXIT_USAGE
    except ClipfusionError as exc:
        if args.debug:
            traceback.print_exc()
        err(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        # one line: where it stopped, what was done, how to go on (a command that knows says the last two)
        where = last_status()
        note = getattr(args, "on_interrupt", None)
        said = note() if callable(note) else "every file written so far is complete"
        err(f"interrupted{f' ({where})' if where else ''}: {said}")
        return EXIT_INTERRUPTED
    except MemoryError:
        err("out of memory; try a smaller --batch-size or --dtype bfloat16")
        return EXIT_ERROR
    except OSError as exc:  # disk full, permissions changed mid-run …: one line naming the file
        if args.debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        err(f"{where}{exc.strerror or exc}")
        return EXIT_ERROR


__all__ = ["build_parser", "main"]
