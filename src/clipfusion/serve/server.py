"""Running the application under uvicorn with a graceful stop.

On SIGTERM (or Ctrl-C) the server stops accepting connections, answers 503 to requests that still arrive on
open connections, lets every admitted request finish (its images are scored and answered), then stops the
detectors' workers and returns normally, so a supervisor sees a clean exit.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, marking the application as draining the moment a stop is asked for, and not
    re-raising the signal afterwards (uvicorn does, which would turn a clean stop into death by SIGTERM)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.stop_signal: int | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.app
        state = getattr(app, "state", None)
        if state is not None:
            state.draining = True
        if self.stop_signal is None:
            self.stop_signal = sig
            name = signal.Signals(sig).name if sig else "stop"
            log.info(f"{name}: finishing the requests in hand, refusing new ones")
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        """Ask for a graceful stop from another thread (what SIGTERM does)."""
        self.handle_exit(0, None)


def make_server(app: Any, host: str, port: int, *, access_log: bool = False) -> GracefulServer:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # clipfusion's logging (console, --log) carries uvicorn's messages too
        access_log=access_log,
        lifespan="on",
        timeout_keep_alive=5,
        server_header=False,
    )
    return GracefulServer(config)


__all__ = ["GracefulServer", "make_server"]
