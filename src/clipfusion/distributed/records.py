"""The driver's bookkeeping of a distributed run, and the run-wide files it writes at the end.

Workers return one small record per image; the driver appends them to Parquet *parts* in
``OUT/.clipfusion-parts/`` every few thousand records (atomically, oldest first by name). The parts are the
run's memory: ``--resume`` reads them to skip every input whose outputs are complete, and the final
``scores.csv`` / ``scores.parquet`` / ``skipped.csv`` / ``report.html`` are assembled from them in input
order, so a run interrupted any number of times ends with the files an uninterrupted run writes.

Nothing in this module imports Ray.
"""

from __future__ import annotations

import csv
import io
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipfusion.files import atomic_write_bytes, atomic_write_text

PARTS = ".clipfusion-parts"
SCORES, OVERLAYS = "scores", "overlays"


class PartsWriter:
    """Records appended in memory and flushed to one Parquet part every ``rows`` records or ``seconds``
    seconds (and on :meth:`close`), so an interrupted run loses at most that much bookkeeping — and never
    the outputs themselves, which a resumed run then finds complete on disk and records again."""

    def __init__(
        self, folder: Path, kind: str, schema: pa.Schema, *, rows: int = 5000, seconds: float = 30.0
    ):
        self.folder = folder / PARTS
        self.kind = kind
        self.schema = schema
        self.rows = rows
        self.seconds = seconds
        self.pending: list[pa.Table] = []
        self.count = 0
        self.last = time.monotonic()

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table.select(self.schema.names).cast(self.schema))
            self.count += table.num_rows
        if self.count >= self.rows or (self.pending and time.monotonic() - self.last >= self.seconds):
            self.flush()

    def flush(self) -> None:
        if self.pending:
            buf = io.BytesIO()
            pq.write_table(pa.concat_tables(self.pending), buf)
            name = f"{self.kind}-{time.time_ns():020d}-{secrets.token_hex(3)}.parquet"
            atomic_write_bytes(self.folder / name, buf.getvalue())
        self.pending, self.count, self.last = [], 0, time.monotonic()

    close = flush


def read_parts(folder: Path, kind: str, schema: pa.Schema) -> pa.Table:
    """Every record of ``kind`` written so far, oldest first (a part that cannot be read — it cannot be
    half-written — is an error naming it)."""
    files = sorted((folder / PARTS).glob(f"{kind}-*.parquet"))
    tables = []
    for file in files:
        try:
            tables.append(pq.read_table(file).select(schema.names).cast(schema))
        except (OSError, pa.ArrowException, KeyError) as exc:
            from clipfusion.errors import InputError

            raise InputError(f"{file}: unreadable record of an earlier run ({exc})") from exc
    return pa.concat_tables(tables) if tables else schema.empty_table()


def latest(records: pa.Table, keys: Sequence[str]) -> pa.Table:
    """The last record per key (a retried input's newest answer wins)."""
    if records.num_rows == 0:
        return records
    order = pa.array(np.arange(records.num_rows), type=pa.int64())
    last = records.append_column("_order", order).group_by(list(keys)).aggregate([("_order", "max")])
    return records.filter(pc.is_in(order, value_set=last.column("_order_max")))


def join_records(inputs: pa.Table, records: pa.Table, keys: Sequence[str]) -> pa.Table:
    """``inputs`` with the latest record of each (left join on ``keys``), in input order."""
    extra = [c for c in records.column_names if c not in inputs.column_names or c in keys]
    joined = inputs.join(latest(records, keys).select(extra), keys=list(keys), join_type="left outer")
    return joined.sort_by("index")


def listing(folder: Path, sub: str) -> set[str]:
    """The files under ``folder/sub`` as ``sub/…/name`` (output names mirror the inputs' folders) — one
    ``scandir`` per folder, not a ``stat`` per image; hidden files (a write in progress) left out."""
    import os

    found: set[str] = set()
    todo = [sub]
    while todo:
        rel = todo.pop()
        try:
            with os.scandir(folder / rel) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        todo.append(f"{rel}/{e.name}")
                    elif not e.name.startswith("."):
                        found.add(f"{rel}/{e.name}")
        except FileNotFoundError:
            continue
    return found


def present(column: pa.ChunkedArray | pa.Array, files: set[str]) -> pa.Array:
    return pc.is_in(column, value_set=pa.array(sorted(files), type=pa.string()))


def write_scores(
    root: Path, table: pa.Table, *, threshold: float | None, masks: bool, weights: str
) -> pa.Table:
    """``scores.csv`` exactly as a local run writes it, and ``scores.parquet`` with the same columns (the
    score at full precision). ``table``: the scored rows in input order."""
    decisions = None
    if threshold is not None:
        decisions = pc.if_else(pc.greater(table.column("score"), threshold), "anomalous", "normal")
    columns = {"path": table.column("path"), "score": table.column("score")}
    if decisions is not None:
        columns["decision"] = decisions
    columns["overlay"] = table.column("overlay")
    columns["map"] = table.column("map")
    if masks:
        columns["mask"] = table.column("mask")
    columns["weights"] = pa.array([weights] * table.num_rows, type=pa.string())
    scores = pa.table(columns)
    buf = io.BytesIO()
    pq.write_table(scores, buf)
    atomic_write_bytes(root / "scores.parquet", buf.getvalue())
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(scores.column_names)
    names = scores.column_names
    for row in zip(*(scores.column(n).to_pylist() for n in names), strict=True):
        writer.writerow([f"{v:.6f}" if n == "score" else v for n, v in zip(names, row, strict=True)])
    atomic_write_text(root / "scores.csv", text.getvalue())
    return scores


__all__ = ["PARTS", "PartsWriter", "join_records", "latest", "listing", "read_parts", "write_scores"]
