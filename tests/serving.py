"""Real servers on 127.0.0.1 for the server tests: uvicorn in a thread, or ``clipfusion serve`` in a
subprocess, and small HTTP helpers. Every server here listens on the loopback address only."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

LOCALHOST = "127.0.0.1"


# -- a server in a thread ------------------------------------------------------------------------------------


@dataclass
class ThreadServer:
    url: str
    server: object
    thread: threading.Thread


@contextmanager
def thread_server(app) -> Iterator[ThreadServer]:
    """uvicorn serving ``app`` on 127.0.0.1 on a free port, in a thread; stopped gracefully at exit."""
    from clipfusion.serve.server import make_server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOCALHOST, 0))
    port = sock.getsockname()[1]
    server = make_server(app, LOCALHOST, port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield ThreadServer(f"http://{LOCALHOST}:{port}", server, thread)
    finally:
        server.stop()
        thread.join(60)
        sock.close()


# -- a server in a subprocess (the real command) -------------------------------------------------------------


@dataclass
class ProcessServer:
    url: str
    process: subprocess.Popen
    log: Path

    def rss(self) -> int:
        """The server process's resident set in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def _env() -> dict[str, str]:
    import clipfusion

    src = str(Path(clipfusion.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextmanager
def process_server(args: list[str], log: Path, timeout: float = 180.0) -> Iterator[ProcessServer]:
    """``clipfusion serve ARGS --port 0`` in a subprocess; yields once it listens (not necessarily ready)."""
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "clipfusion", "serve", *args, "--host", LOCALHOST, "--port", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    try:
        deadline = time.monotonic() + timeout
        url = None
        while url is None:
            if process.poll() is not None:
                raise RuntimeError(f"clipfusion serve exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"clipfusion serve did not start:\n{log.read_text()}")
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", log.read_text())
            url = found.group(1) if found else None
            time.sleep(0.1)
        yield ProcessServer(url, process, log)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def wait_ready(url: str, timeout: float = 180.0, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", headers=headers, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def files_payload(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
