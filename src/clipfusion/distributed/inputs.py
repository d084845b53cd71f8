"""What a distributed run scores: image files, folders and lists of paths, resolved on the driver into one
Arrow table — fast enough for a million paths.

A plant's archive is scored from a list (a text file with one path a line, a CSV or a Parquet file with a
``path`` column) or from folders. Lists are read with pyarrow's readers and every per-path step (joining
onto the list's folder, the output file names) is an Arrow compute kernel; folders are walked with
``os.scandir``. Nothing here opens an image: the workers do that with :func:`clipfusion.data.load_image`,
and a listed file that is missing or unreadable becomes a line of ``skipped.csv``, not a failed job.

Folders are expanded exactly as a local ``predict`` expands them (recursively, image suffixes only, hidden
files left out, symbolic links to folders not followed, sorted as :mod:`pathlib` sorts paths), and output
names mirror the input paths the same way, so a Ray run and a local run of the same inputs write the same
files.

Nothing in this module imports Ray.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from clipfusion.data._common import IMAGE_SUFFIXES
from clipfusion.errors import InputError, InputErrors

#: list files, by suffix: one path a line, or a table with a ``path`` column
LIST_SUFFIXES = {".txt": "text", ".lst": "text", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
PATH_COLUMN = "path"
log = logging.getLogger(__name__)


def _walk(root: str, exclude: frozenset[str] = frozenset(), left_out: list[str] | None = None) -> list[str]:
    """Image files under ``root``, relative to it, in the order ``sorted(Path(root).rglob("*"))`` gives,
    without entering a folder of ``exclude`` (real paths) or one that holds a clipfusion run (appended to
    ``left_out``), as :func:`clipfusion.data.checks.collect_images` walks."""
    from clipfusion.data.checks import holds_run

    found: list[tuple[list[str], str]] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel_dir) if rel_dir else root) as entries:
                for entry in entries:
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if os.path.realpath(entry.path) in exclude or holds_run(Path(entry.path)):
                                if left_out is not None:
                                    left_out.append(os.path.join(root, rel))
                            else:
                                stack.append(rel)
                            continue
                        if (
                            not entry.name.startswith(".")
                            and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
                            and entry.is_file()
                        ):
                            found.append((rel.split("/"), rel))
                    except OSError:
                        continue
        except PermissionError:
            continue
    # pathlib orders paths by their parts, not by the joined string ("a/b" before "a/b-c")
    found.sort(key=lambda item: item[0])
    return [rel for _, rel in found]


def _join(base: str, names: pa.Array) -> pa.Array:
    """``base/name`` for each name, ``name`` itself when absolute or when ``base`` is ``"."`` — as
    ``str(Path(base) / name)`` would give for the normalised names a walk or a list yields."""
    if base in ("", "."):
        return names
    joined = pc.binary_join_element_wise(pa.scalar(base.rstrip("/") or "/"), names, "/")
    if base == "/":
        joined = pc.replace_substring_regex(joined, "^//", "/")
    return pc.if_else(pc.starts_with(names, "/"), names, joined)


def _read_list(path: Path) -> pa.Array:
    """The paths a list file names, as written (whitespace trimmed; empty lines and ``#`` comments of text
    lists dropped)."""
    kind = LIST_SUFFIXES[path.suffix.lower()]
    try:
        if kind == "text":
            lines = path.read_bytes().decode("utf-8").splitlines()
            values = pc.utf8_trim_whitespace(pa.array(lines, type=pa.string()))
            keep = pc.and_(pc.not_equal(values, ""), pc.invert(pc.starts_with(values, "#")))
            return values.filter(keep)
        if kind == "csv":
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(
                path, convert_options=pacsv.ConvertOptions(column_types={PATH_COLUMN: pa.string()})
            )
        else:
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            if PATH_COLUMN not in schema.names:
                raise InputError(
                    f"{path}: no {PATH_COLUMN!r} column in this list (columns: {', '.join(schema.names)})"
                )
            table = pq.read_table(path, columns=[PATH_COLUMN])
    except InputError:
        raise
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: list is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: cannot read this list of paths ({' '.join(str(exc).split())})") from exc
    if PATH_COLUMN not in table.column_names:
        raise InputError(
            f"{path}: no {PATH_COLUMN!r} column in this list (columns: {', '.join(table.column_names)})"
        )
    column = table.column(PATH_COLUMN).combine_chunks()
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise InputError(f"{path}: the {PATH_COLUMN!r} column holds {column.type}, not text")
    column = pc.utf8_trim_whitespace(column.cast(pa.string()).fill_null(""))
    return column.filter(pc.not_equal(column, ""))


def is_url(item: str | Path) -> bool:
    """``s3://…``, ``gs://…``, ``https://…`` — also after ``Path`` has folded the two slashes into one."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(item)) is not None


def is_list_file(path: Path) -> bool:
    return path.suffix.lower() in LIST_SUFFIXES and path.is_file()


def resolve_inputs(items: Sequence[str | Path], *, exclude: Sequence[str | Path] = ()) -> pa.Table:
    """Files, folders and list files → a table with ``path`` (as given or listed, for the outputs) and
    ``source`` (absolute, what the workers open). Relative paths in a list are taken relative to the
    list's own folder (a list travels with its images); those on the command line relative to the current
    folder.

    Every problem (a missing input, a folder without images, an unreadable list, a URL) is collected and
    raised at once as :class:`~clipfusion.errors.InputErrors`, one line each. A folder walk never enters a
    folder of ``exclude`` (the run's own ``--out``) nor one that holds a clipfusion run.
    """
    from clipfusion.data.checks import RUN_MANIFEST, holds_run

    parts: list[pa.Table] = []
    problems: list[str] = []
    skip = frozenset(os.path.realpath(p) for p in exclude)
    left_out: list[str] = []
    for item in items:
        if is_url(item):
            problems.append(
                f"{item}: URLs are not supported as inputs; give paths every worker can read (a shared or "
                "mounted file system)"
            )
            continue
        given = Path(item)
        shown = str(given)
        if given.is_dir():
            if os.path.realpath(given) in skip or holds_run(given):
                problems.append(
                    f"{given}: holds the outputs of a clipfusion run ({RUN_MANIFEST}), not input images; "
                    "give the image files themselves to score them"
                )
                continue
            found = pa.array(_walk(shown, skip, left_out), type=pa.string())
            if len(found) == 0:
                problems.append(f"{given}: folder contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
                continue
            parts.append(
                pa.table({"path": _join(shown, found), "source": _join(os.path.abspath(shown), found)})
            )
        elif given.is_file() and is_list_file(given):
            try:
                listed = _read_list(given)
            except InputError as exc:
                problems.append(str(exc))
                continue
            urls = listed.filter(pc.match_substring(listed, "://"))
            if len(urls):
                problems.append(
                    f"{given}: lists URLs ({urls[0]} …); inputs must be paths every worker can read "
                    "(a shared or mounted file system)"
                )
                continue
            if len(listed) == 0:
                problems.append(f"{given}: the list names no paths")
                continue
            folder = str(given.parent)
            parts.append(
                pa.table({"path": _join(folder, listed), "source": _join(os.path.abspath(folder), listed)})
            )
        elif given.is_file():
            parts.append(pa.table({"path": [shown], "source": [os.path.abspath(shown)]}))
        else:
            problems.append(f"{given}: no such file or folder")
    if left_out:
        shown_out = ", ".join(left_out[:3]) + (" …" if len(left_out) > 3 else "")
        log.info(
            f"left out {len(left_out)} folder{'s' * (len(left_out) != 1)} of clipfusion outputs (this run's "
            f"--out, or an earlier run with its {RUN_MANIFEST}): {shown_out}"
        )
    if problems:
        raise InputErrors(problems)
    if not parts:
        raise InputError("no input images given")
    table = pa.concat_tables(parts).combine_chunks()
    return table.append_column("index", pa.array(range(table.num_rows), type=pa.int64()))


def output_stems(paths: pa.Array | pa.ChunkedArray) -> list[str]:
    """The output name of each input (the names :func:`clipfusion.outputs.predictions.unique_stems` gives:
    the path below the inputs' common folder, without suffix). Absolute, normalised paths (a table's
    ``source``) are used as they are; only the others go through :func:`os.path.abspath`, in Python."""
    from clipfusion.outputs.predictions import mirrored_stems

    values = paths.to_pylist()
    odd = pc.match_substring_regex(paths, r"^[^/]|//|(^|/)\.\.?(/|$)")
    for i in pc.indices_nonzero(odd).to_pylist():
        values[i] = os.path.abspath(values[i])
    return mirrored_stems(values)


def with_output_names(table: pa.Table, *, masks: bool) -> pa.Table:
    """Add the files each input gets (relative to the output folder): ``map``, ``overlay`` and, with a
    pixel threshold, ``mask``."""
    stems = pa.array(output_stems(table.column("source")), type=pa.string())
    table = table.append_column("map", pc.binary_join_element_wise("maps/", stems, ".npy", ""))
    table = table.append_column("overlay", pc.binary_join_element_wise("overlays/", stems, ".png", ""))
    if masks:
        table = table.append_column("mask", pc.binary_join_element_wise("masks/", stems, ".png", ""))
    return table


__all__ = ["LIST_SUFFIXES", "is_list_file", "is_url", "output_stems", "resolve_inputs", "with_output_names"]
