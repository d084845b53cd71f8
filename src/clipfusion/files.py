"""Files, the way every part of clipfusion touches them: atomic writes, one JSON reader, content hashes.

Atomic writes: an interrupted run never leaves a truncated CSV, JSON, PNG or NPY behind. The temporary file
is created with mode 0666 and the kernel applies the user's umask to it, exactly as for ``open(path, "w")``
— so a colleague or a web server can read a report whenever the umask lets them (``tempfile.mkstemp`` would
force 0600 on every output, whatever the umask).

One JSON reader (:func:`read_json`): every JSON file the tool reads (thresholds, a fitted detector, a weights
or run manifest, ``results.json``, a sweep's inputs) answers a missing, unreadable, non-UTF-8 or malformed
file with the same one-line :class:`~clipfusion.errors.InputError` naming the file and what it should have
been, never a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from clipfusion.errors import InputError

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty file beside ``path`` (same folder, so the final rename is atomic)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _OPEN_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def read_json(path: str | Path, what: str, *, hint: str = "") -> Any:
    """The JSON value in ``path``, or one :class:`InputError` line that names the file, says which
    ``what`` it should have been (``"thresholds file"``, ``"run manifest"`` …) and, given a ``hint``, what to
    do about it. Whether the value has the expected shape is the caller's question."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not valid JSON (not UTF-8 text: {exc.reason}); unreadable {what}{tail}"
        ) from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what} ({exc.strerror or exc}){tail}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); unreadable {what}{tail}") from exc


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The file's sha256 (hex), read in chunks: weights files are gigabytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def looks_like_path(value: str, suffixes: Iterable[str] = ()) -> bool:
    """Whether an option's value names a file or folder (a separator, ``~`` or ``.`` first, or one of the
    file ``suffixes``) rather than a name that a library resolves (an open_clip tag, a hub id)."""
    return (
        os.sep in value
        or "/" in value
        or value.startswith(("~", "."))
        or value.lower().endswith(tuple(suffixes))
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def private_temp_dir(prefix: str) -> Path:
    """A new folder in the system's temporary folder, named ``{prefix}{pid}-{random}-{host}``, after
    removing the folders of the same prefix that processes of this host left behind and that no longer
    run: a process killed with SIGKILL (a Ray worker killed mid-load) cannot clean up after itself, so the
    next one does. Folders of other hosts (a shared ``/tmp``), other users and running processes stay."""
    import shutil
    import socket
    import tempfile

    root = Path(tempfile.gettempdir())
    host = socket.gethostname()
    for old in root.glob(f"{prefix}*"):
        pid, _, rest = old.name[len(prefix) :].partition("-")
        _, _, owner = rest.partition("-")
        try:
            mine = old.is_dir() and not old.is_symlink() and old.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and owner == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}-{host}"
    path.mkdir(mode=0o700)
    return path


__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "looks_like_path",
    "private_temp_dir",
    "read_json",
    "sha256_file",
]
