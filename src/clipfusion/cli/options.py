"""What the commands share: the model options, the weights folder, a ``--fitted`` folder checked before any
model loads, status and error lines (through :mod:`logging`), and the options every command takes (``-q``,
``-v``, ``--log``, ``--no-progress``).

This is the only place that reads ``CLIPFUSION_WEIGHTS``: the library takes the weights folder as an explicit
``weights_dir`` and never looks at (or writes) the environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from clipfusion.config import (
    PRESETS,
    CLIPFusionConfig,
    check_batch_size,
    load_config,
    load_preset,
    parse_overrides,
    with_overrides,
)
from clipfusion.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from clipfusion.fitted import FittedRecord
    from clipfusion.thresholds import Thresholds

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
WEIGHTS_ENV = "CLIPFUSION_WEIGHTS"


log = logging.getLogger("clipfusion")


def err(message: str) -> None:
    """A user-facing error, one ``clipfusion: error:`` line per line of the message (and in ``--log``)."""
    for line in str(message).splitlines() or [""]:
        log.error(line)


def say(message: str) -> None:
    """A status line on stderr (stdout is kept for results); hidden by ``--quiet``."""
    log.info(message)


def warn(message: str) -> None:
    """A warning line: shown even with ``--quiet``."""
    log.warning(message)


# -- the options every command takes --


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``-q``, ``-v``, ``--log FILE`` and ``--no-progress`` (added to every subcommand by the CLI)."""
    known = {a.dest for a in parser._actions}  # argparse has no public listing of its options
    group = parser.add_argument_group("output")
    if "quiet" not in known:
        group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress")
        group.add_argument("-v", "--verbose", action="store_true", help="also debug messages")
        group.add_argument("--log", type=Path, metavar="FILE", help="also write every message to this file")
    if "no_progress" not in known:
        group.add_argument("--no-progress", action="store_true", help="no progress bars")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and notebooks replace it). An error ends the
    progress bars still open (their work stopped), so it always starts a line of its own; the last status
    line is kept, to say where an interrupted command stopped."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        global _last_status
        self.stream = sys.stderr
        if record.levelno >= logging.ERROR:
            from clipfusion.progress import close_open_bars

            close_open_bars()
        elif record.levelno == logging.INFO:
            _last_status = record.getMessage()
        super().emit(record)


#: the last status line shown (what the command was doing), for the line an interruption prints
_last_status = ""


def last_status() -> str:
    """The last status line a command showed: where it was when interrupted."""
    return _last_status


class _ConsoleFormatter(logging.Formatter):
    """Status lines as they are; warnings and errors prefixed so that scripts can grep them."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"clipfusion: error: {message}"
        if record.levelno >= logging.WARNING:
            return f"clipfusion: warning: {message}"
        if record.levelno <= logging.DEBUG:
            return f"clipfusion: debug: {record.name}: {message}"
        return message


#: the handlers the last configure_logging call installed (and the next one replaces)
_installed: list[logging.Handler] = []


def _install(handler: logging.Handler) -> None:
    _installed.append(handler)
    log.addHandler(handler)


def configure_logging(args: argparse.Namespace) -> None:
    """The console handler (level from ``-q`` / ``-v``) and the ``--log FILE`` handler (everything).

    Replaces what an earlier call installed, so that ``main()`` can run several times in one process.
    """
    global _last_status
    _last_status = ""
    while _installed:
        handler = _installed.pop()
        log.removeHandler(handler)
        handler.close()
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    console = _StderrHandler()
    console.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(_ConsoleFormatter())
    _install(console)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    log_file = getattr(args, "log", None)
    if log_file is not None:
        from clipfusion.outputs.folders import check_output_file

        check_output_file(log_file, "--log")
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setLevel(logging.DEBUG)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        _install(to_file)


def show_progress(args: argparse.Namespace) -> bool:
    return not (getattr(args, "no_progress", False) or getattr(args, "quiet", False))


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
        help="model precision (default auto: bfloat16 where a micro-benchmark finds it faster than float32 "
        "on this CPU, float16 or bfloat16 on CUDA, else float32)",
    )
    group.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    add_weights_option(group)


def build_config(args: argparse.Namespace) -> CLIPFusionConfig:
    """The configuration the model options describe: a preset or a file, then ``--set``, then the
    placement options (``--device`` / ``--dtype`` apply to both branches)."""
    if args.config and args.preset:
        raise ConfigError("give either --preset or --config, not both")
    if args.config:
        from clipfusion.outputs.folders import check_input_file

        check_input_file(args.config, "--config")
    config = load_config(args.config) if args.config else load_preset(args.preset or "paper")
    overrides = parse_overrides(args.overrides)
    if args.device:
        overrides["device"] = args.device
    if args.dtype:
        overrides["dtype"] = args.dtype
    check_batch_size(args.batch_size, "--batch-size")
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


def read_fitted(args: argparse.Namespace) -> dict[str, FittedRecord]:
    """``--fitted DIR [DIR …]`` (several as ``DIR`` or ``NAME=DIR``, named as a server names them), each
    folder checked before any model is loaded; the options a fit replaces are refused (``--device`` stays:
    where a fit runs does not change it). One folder keeps its path as given, whatever its name."""
    from clipfusion.fitted import parse_fitted, read

    specs = [str(spec) for spec in args.fitted]
    given = [
        o
        for o, v in (
            ("--object", args.object),
            ("--refs", args.refs),
            ("--preset", args.preset),
            ("--config", args.config),
            ("--set", args.overrides),
            ("--dtype", args.dtype),
        )
        if v
    ]
    if given:
        raise ConfigError(
            f"--fitted takes the object, references and configuration from {' '.join(specs)}; "
            f"drop {', '.join(given)}"
        )
    name, sep, rest = specs[0].partition("=")
    if len(specs) == 1 and not (sep and rest and "/" not in name and not Path(specs[0]).exists()):
        path = Path(specs[0])
        return {path.name or str(path): read(path)}
    return {name: read(path) for name, path in parse_fitted(specs).items()}


def check_weights(config: CLIPFusionConfig, args: argparse.Namespace) -> None:
    """Before any image is checked or model loaded: a device or dtype this machine cannot run, then
    pretrained weights that are neither on this machine nor downloadable, fail the command at once (not
    after the hub client's retries)."""
    from clipfusion.models.weights import check_available
    from clipfusion.runtime import resolve_placement

    device = getattr(args, "device", None)
    resolve_placement(config.replace(device=device) if device else config)
    check_available(config, weights_dir(args))


def check_thresholds_early(
    thresholds: Thresholds,
    where: str,
    config: CLIPFusionConfig,
    *,
    fitted: FittedRecord | None = None,
    object_name: str | None = None,
    references: Sequence[Path] = (),
) -> None:
    """``--thresholds FILE`` against the fit this run will make (its configuration, object and references),
    before any model loads: a refused file costs seconds, not a model load."""
    from types import SimpleNamespace

    from clipfusion.data.names import object_name as prompt_name
    from clipfusion.thresholds import check_thresholds_for

    if fitted is not None:
        fit = SimpleNamespace(
            config=fitted.config, object_name=fitted.object_name, references=fitted.reference_names
        )
    else:
        name = prompt_name(object_name or "", config.object_names)
        fit = SimpleNamespace(config=config, object_name=name, references=[str(r) for r in references])
    check_thresholds_for(thresholds, fit, where)


#: the three ways out when the pretrained weights are not on the machine
WEIGHTS_HINT = (
    "the pretrained weights are not on this machine. Either: (1) run `clipfusion weights fetch --to DIR` "
    "on a connected machine and copy DIR here; (2) pass --weights-dir DIR (or set CLIPFUSION_WEIGHTS=DIR) "
    "where DIR holds them; or (3) use --preset tiny for a pipeline check with random weights (no detection "
    "quality)"
)


__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "WEIGHTS_ENV",
    "WEIGHTS_HINT",
    "add_common_options",
    "add_model_options",
    "add_weights_option",
    "build_config",
    "check_thresholds_early",
    "check_weights",
    "configure_logging",
    "err",
    "last_status",
    "read_fitted",
    "say",
    "show_progress",
    "warn",
    "weights_dir",
    "weights_origin",
]
