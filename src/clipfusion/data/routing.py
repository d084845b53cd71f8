"""Which fitted object scores which input: a mixed batch of a production line routed by a list or by folders.

With several fitted objects (``clipfusion predict --fitted A B C INPUTS``) every input must say its object:

- a list, ``.csv`` or ``.parquet``, with a ``path`` and an ``object`` column (relative paths are taken
  relative to the list's own folder, so that a list travels with its images);
- a folder of sub-folders named after the objects (``INPUTS/bottle/…``, ``INPUTS/cable/…``), each walked as
  any input folder is.

Every problem (a row naming an unknown object, a sub-folder no object is named after, a loose image that
says nothing of its object) is one line, all of them reported at once.
"""

from __future__ import annotations

import csv
import difflib
from collections.abc import Sequence
from pathlib import Path

from clipfusion.data._common import is_image_file
from clipfusion.data.checks import collect_images
from clipfusion.errors import one_line

LIST_SUFFIXES = (".csv", ".parquet", ".pq")
PATH_COLUMN, OBJECT_COLUMN = "path", "object"


def _unknown(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"names the object {name!r}, which no fitted folder is (known: {', '.join(names)}){hint}"


def _read_table(path: Path) -> list[tuple[str, str]]:
    """``(path, object)`` rows of a list file, as written."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in (PATH_COLUMN, OBJECT_COLUMN) if c not in columns]
            if missing:
                found = ", ".join(columns)
                raise ValueError(f"no {' and no '.join(map(repr, missing))} column (columns: {found})")
            return [((row[PATH_COLUMN] or "").strip(), (row[OBJECT_COLUMN] or "").strip()) for row in reader]
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError(f"reading a .parquet list needs pyarrow (pip install pyarrow): {exc}") from exc
    table = pq.read_table(path)
    missing = [c for c in (PATH_COLUMN, OBJECT_COLUMN) if c not in table.column_names]
    if missing:
        raise ValueError(
            f"no {' and no '.join(map(repr, missing))} column (columns: {', '.join(table.column_names)})"
        )
    paths = table.column(PATH_COLUMN).to_pylist()
    objects = table.column(OBJECT_COLUMN).to_pylist()
    return [(str(p or "").strip(), str(o or "").strip()) for p, o in zip(paths, objects, strict=True)]


def route_inputs(
    inputs: Sequence[str | Path], names: Sequence[str], *, exclude: Sequence[str | Path] = ()
) -> tuple[list[tuple[Path, str]], list[str]]:
    """``(image path, object name)`` for every input, in input order, and one line per problem (listed, not
    raised, as :func:`~clipfusion.data.checks.collect_images` lists them). Folders are walked as any input
    folder is: never into ``exclude`` (the run's own output folder) nor into a folder holding a run."""
    routed: list[tuple[Path, str]] = []
    problems: list[str] = []
    known = set(names)
    for item in map(Path, inputs):
        if item.is_file() and item.suffix.lower() in LIST_SUFFIXES:
            try:
                rows = _read_table(item)
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                problems.append(f"{item}: cannot read this list ({' '.join(str(exc).split())})")
                continue
            except Exception as exc:  # pyarrow's own errors
                problems.append(f"{item}: cannot read this list ({one_line(exc)})")
                continue
            if not rows:
                problems.append(f"{item}: the list names no image")
            for line, (path, name) in enumerate(rows, start=2):
                if not path:
                    problems.append(f"{item}: row {line}: no path")
                elif name not in known:
                    problems.append(f"{item}: row {line} ({path}) {_unknown(name, names)}")
                else:
                    file = Path(path) if Path(path).is_absolute() else item.parent / path
                    routed.append((file, name))
        elif item.is_dir():
            if any(is_image_file(p) for p in item.iterdir()):
                problems.append(
                    f"{item}: holds images directly; with several fitted objects put each object's images in "
                    f"a sub-folder named after it ({', '.join(names)})"
                )
            folders = sorted(p for p in item.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not folders:
                problems.append(f"{item}: no sub-folder named after a fitted object ({', '.join(names)})")
            for folder in folders:
                if folder.name not in known:
                    problems.append(f"{folder}: {_unknown(folder.name, names)}")
                    continue
                files, found_problems = collect_images([folder], exclude=exclude)
                problems += found_problems
                routed += [(file, folder.name) for file in files]
        elif item.is_file():
            problems.append(
                f"{item}: with several fitted objects every input must say its object: give a .csv or "
                f".parquet list with {PATH_COLUMN!r} and {OBJECT_COLUMN!r} columns, or a folder of "
                f"sub-folders named after the objects ({', '.join(names)})"
            )
        else:
            problems.append(f"{item}: no such file or folder")
    return routed, problems


__all__ = ["LIST_SUFFIXES", "OBJECT_COLUMN", "PATH_COLUMN", "route_inputs"]
