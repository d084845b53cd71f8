"""``clipfusion serve``: fitted detectors behind an HTTP API, with the inspector page at ``/``.

Everything that can be checked before a port is opened is: the fitted folders (read, hashed, no model
loaded), the options, the token rule (a server reachable from other machines needs one). The models are
then loaded in the background while ``/healthz`` already answers; ``/readyz`` says when they are in.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from clipfusion.cli.options import (
    EXIT_OK,
    EXIT_USAGE,
    add_weights_option,
    err,
    say,
    warn,
    weights_dir,
)
from clipfusion.errors import ConfigError
from clipfusion.provenance import random_weights_banner

#: the token may come from the environment instead of the command line (where `ps` shows it)
TOKEN_ENV = "CLIPFUSION_SERVE_TOKEN"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve fitted detectors over HTTP (API under /v1, the inspector page at /)",
        description=(
            "Serve one or more fitted detectors (made by `clipfusion fit`). API: /v1 (documented at /docs); "
            "inspector page: /; health: /healthz, /readyz."
        ),
    )
    p.add_argument(
        "--fitted",
        nargs="+",
        required=True,
        metavar="DIR",
        help="fitted detector folders, served under their folder name, or NAME=DIR",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument(
        "--batch-size", type=int, help="images per forward pass, at most (default: the detector's own)"
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long an image waits for others to share its batch (default 10)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=32,
        help="requests admitted per detector at once; more get 503 with Retry-After (default 32)",
    )
    p.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest request body in MB (default 20)"
    )
    p.add_argument("--max-images", type=int, default=16, help="images per request, at most (default 16)")
    p.add_argument(
        "--token",
        help=f"require 'Authorization: Bearer TOKEN' on /v1 (or set ${TOKEN_ENV}); needed off localhost",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser pages from this origin to call the API (e.g. http://hmi.local:3000); repeatable",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: the fitted configuration's)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    add_weights_option(p)
    p.set_defaults(func=run)


def _token(args: argparse.Namespace) -> str | None:
    if args.token:
        return str(args.token)
    value = os.environ.get(TOKEN_ENV, "").strip()
    return value or None


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is taken before loading anything (uvicorn would say so only after the models)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            raise ConfigError(
                f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})"
            ) from exc


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"clipfusion serve needs the server packages ({exc.name} is missing): "
            "pip install 'clipfusion[serve]'"
        ) from exc
    from clipfusion.serve.app import ServeSettings, create_app, is_local_host
    from clipfusion.serve.pool import DetectorPool, Limits, parse_fitted
    from clipfusion.serve.server import make_server

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must lie in 0..65535, got {args.port}")
    token = _token(args)
    if not is_local_host(args.host) and not token:
        raise ConfigError(
            f"--host {args.host} makes the server reachable from other machines: give --token TOKEN "
            f"(or set {TOKEN_ENV}); clients then send 'Authorization: Bearer TOKEN'"
        )
    settings = ServeSettings(
        max_upload_mb=args.max_upload_mb,
        max_images=args.max_images,
        token=token,
        cors_origins=tuple(args.cors_origin),
    )
    limits = Limits(batch_size=args.batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
    named = parse_fitted(args.fitted)
    pool = DetectorPool(
        {name: Path(path) for name, path in named.items()},
        limits,
        weights_dir=weights_dir(args),
        device=args.device,
    )
    _check_port(args.host, args.port)
    for slot in pool.slots.values():
        banner = random_weights_banner(slot.record.config)
        if banner:
            warn(f"{slot.name}: {banner}")

    failures: list[str] = []
    server = None

    def on_failure(name: str, message: str) -> None:
        failures.append(f"detector {name!r} could not be loaded: {message}")
        if server is not None:
            server.stop()

    app = create_app(pool, settings, on_failure=on_failure)
    server = make_server(app, args.host, args.port, access_log=args.access_log)
    # uvicorn's own messages (startup, errors) go to the same console and --log file as ours
    clipfusion_log = logging.getLogger("clipfusion")
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv = logging.getLogger(name)
        uv.handlers = list(clipfusion_log.handlers)
        uv.setLevel(logging.INFO)
        uv.propagate = False
    host = f"[{args.host}]" if ":" in args.host else args.host
    names = ", ".join(pool.slots)
    say(
        f"serving {len(pool.slots)} detector(s) ({names}) on http://{host}:{args.port}/ — API /v1, "
        f"docs /docs; loading the models (/readyz says when they are in)"
        + ("; token required on /v1" if token else "")
    )
    server.run()
    if failures:
        for line in failures:
            err(line)
        return EXIT_USAGE
    say("stopped")
    return EXIT_OK
