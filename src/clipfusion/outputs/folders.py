"""Where a run writes: paths checked before any work, an output folder that belongs to one run.

A prediction run lists every file it writes in ``manifest.json`` (written first, marked complete last), so
that running again into the same folder never silently mixes two runs: it is refused unless the user asks
for ``--overwrite``, which removes exactly the earlier run's files and nothing else, or for ``--resume``,
which continues an interrupted run of the same settings. A folder is only created once the models are
loaded, so a run that fails early leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clipfusion.errors import ConfigError, InputError
from clipfusion.files import atomic_write_text, read_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
#: a local run's records, one JSON line per scored image, appended batch by batch: what ``--resume`` reads
LOCAL_RECORDS = ".clipfusion-parts/scores.jsonl"


def _first_existing(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def check_creatable(path: str | Path, option: str, what: str = "folder") -> None:
    """Refuse, in one line, a path where nothing can be created: a parent that is a file, or a read-only
    parent folder."""
    path = Path(path)
    existing = _first_existing(path.parent if what == "file" else path)
    if existing != path and not existing.is_dir():
        raise InputError(
            f"{path}: cannot create this {what} for {option}: {existing} is a file, not a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot create this {what} for {option}: {existing} is not writable")


def check_output_file(path: str | Path, option: str) -> Path:
    """A file the run will write (``--save``, ``--log``): not a folder, its folder creatable."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: {option} names a folder; give a file name")
    check_creatable(path, option, what="file")
    return path


def check_input_file(path: str | Path, option: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {option} file not found")
    if not path.is_file():
        raise InputError(f"{path}: {option} must name a file, not a folder")
    return path


def check_input_folder(path: str | Path, option: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {option} folder not found")
    if not path.is_dir():
        raise InputError(f"{path}: {option} must name a folder, not a file")
    return path


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    data = read_json(path, "run manifest", hint="choose another --out")
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or "files" not in data:
        raise InputError(f"{path}: not a clipfusion run manifest; choose another --out")
    return data


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def _count_maps(folder: Path) -> int:
    """The maps written so far (``maps/**/*.npy``): one ``scandir`` per folder."""
    count, todo = 0, [folder / "maps"]
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        todo.append(Path(e.path))
                    elif e.name.endswith(".npy") and not e.name.startswith("."):
                        count += 1
        except OSError:
            continue
    return count


def run_state(folder: Path, manifest: dict[str, Any]) -> str:
    """How far a run got, in words: ``"120 of 480 images scored"`` (its maps on disk)."""
    images = manifest.get("images")
    done = _count_maps(folder)
    if isinstance(images, int):
        done = min(done, images)
        return f"{done} of {images} images scored"
    return f"{done} images scored"


def interrupted_note(path: str | Path, option: str = "--out") -> str:
    """What an interrupted prediction run leaves in ``path`` and how to go on, in one line (what the command
    says on Ctrl-C)."""
    path = Path(path)
    try:
        manifest = read_manifest(path) if path.is_dir() else None
    except InputError:
        manifest = None
    if manifest is None:
        return f"nothing was written to {path}; run the same command again"
    if manifest.get("complete"):
        return f"the run in {path} is complete and untouched"
    return (
        f"{run_state(path, manifest)}, kept in {path} ({MANIFEST} marks the run interrupted); run the same "
        "command with --resume to continue it"
    )


class OutputFolder:
    """The output folder of one run (``--out``): checked up front, created on first use, owned through its
    manifest.

    ``check()`` runs before any model work; ``open(files)`` creates the folder (removing an earlier run's
    files when ``overwrite`` is set, continuing an interrupted one when ``resume`` is set) and writes the
    manifest listing ``files`` as not yet complete; ``close()`` marks it complete.

    ``run``: what decides the outputs (the fit, the thresholds, the normalisation …), recorded in the
    manifest; ``--resume`` continues only a run of the same settings.
    """

    def __init__(
        self, path: str | Path, *, overwrite: bool = False, option: str = "--out", resume: bool = False
    ) -> None:
        if overwrite and resume:
            raise ConfigError("give either --resume or --overwrite, not both")
        self.path = Path(path)
        self.overwrite = overwrite
        self.resume = resume
        self.option = option
        self.manifest: dict[str, Any] = {}
        #: whether :meth:`open` continued an earlier run (``resume``)
        self.resumed = False

    def check(self, run: dict[str, Any] | None = None) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: {self.option} names an existing file; give a folder")
        check_creatable(path, self.option)
        if not path.is_dir():
            return
        earlier = read_manifest(path)
        if earlier is not None:
            if self.resume:
                self._check_same_run(earlier, run)
                return
            if not self.overwrite:
                if not earlier.get("complete"):
                    raise InputError(
                        f"{path}: holds an interrupted clipfusion run ({run_state(path, earlier)}, started "
                        f"{earlier.get('created', '?')}); add --resume to continue it, or --overwrite to "
                        "start again"
                    )
                raise InputError(
                    f"{path}: holds an earlier clipfusion run ({len(earlier['files'])} files listed in its "
                    f"{MANIFEST}); add --overwrite to replace it, or choose another {self.option}"
                )
            return
        foreign = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        if foreign:
            shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "")
            raise InputError(
                f"{path}: folder is not empty and holds no clipfusion run ({shown}); choose a new or empty "
                f"{self.option} folder"
            )

    def _check_same_run(self, earlier: dict[str, Any], run: dict[str, Any] | None) -> None:
        """``--resume``: the earlier run must be a local run of the same settings (those of ``run`` known)."""
        if earlier.get("engine", "local") != "local":
            raise InputError(
                f"{self.path}: holds a run of the {earlier.get('engine')} engine; resume it with --engine "
                f"{earlier.get('engine')} (or use --overwrite to start again)"
            )
        if run is None:
            return
        before, now = earlier.get("run") or {}, _canonical(run)
        differing = sorted(k for k in now if before.get(k) != now[k])
        if differing:
            raise InputError(
                f"{self.path}: the earlier run used another {', '.join(differing)}; --resume continues the "
                "same run (use --overwrite to start again)"
            )

    def open(self, files: Iterable[str], *, run: dict[str, Any] | None = None, **details: Any) -> Path:
        """Create the folder and claim it: an earlier run's files go (with ``overwrite``), the manifest
        lists the files this run will write (relative paths) before any of them exists. With ``resume``, an
        earlier run of the same ``run`` settings is continued instead (:attr:`resumed`)."""
        self.check(run)
        self.path.mkdir(parents=True, exist_ok=True)
        earlier = read_manifest(self.path) if self.resume else None
        if earlier is not None:
            self.resumed = True
            self.manifest = {
                **earlier,
                **details,
                "complete": False,
                "resumed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": sorted(set(earlier["files"]) | set(files)),
            }
            self._write_manifest()
            return self.path
        if self.overwrite:
            self._remove_earlier_run()
        self.manifest = {
            "format": MANIFEST_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "complete": False,
            **({"run": _canonical(run)} if run is not None else {}),
            **details,
            "files": sorted(set(files)),
        }
        self._write_manifest()
        return self.path

    def close(self) -> None:
        self.manifest["complete"] = True
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2) + "\n")

    def _remove_earlier_run(self) -> None:
        earlier = read_manifest(self.path)
        if earlier is None:
            return
        root = self.path.resolve()
        folders = set()
        # a run too large to list every file (a distributed run) names its per-image files by patterns
        # ("maps/*.npy"); a pattern never reaches outside the folder (no "..", no absolute path)
        patterns = [p for p in earlier.get("patterns", []) if isinstance(p, str) and ".." not in p]
        listed = [
            str(t.relative_to(self.path))
            for p in patterns
            if not p.startswith("/")
            for t in self.path.glob(p)
        ]
        for rel in list(earlier["files"]) + listed:
            target = (self.path / rel).resolve()
            if root not in target.parents:  # a manifest never points outside its own folder
                continue
            if target.is_file():
                target.unlink()
            folders.update(p for p in target.parents if root in p.parents)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        (self.path / MANIFEST).unlink(missing_ok=True)
