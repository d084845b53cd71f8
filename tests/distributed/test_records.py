"""The driver's records of a distributed run and the files assembled from them. No Ray, no model."""

import csv

import pyarrow as pa
import pytest

from clipfusion.distributed import records as rec
from clipfusion.distributed.worker import RECORD_SCHEMA
from clipfusion.errors import InputError


def _records(rows):
    base = {"problem": None, "score": None, "map_min": None, "map_max": None, "worker": "h:1"}
    return pa.Table.from_pylist([{**base, **r} for r in rows], schema=RECORD_SCHEMA)


def test_parts_are_flushed_atomically_and_the_newest_record_wins(tmp_path):
    writer = rec.PartsWriter(tmp_path, rec.SCORES, RECORD_SCHEMA, rows=2)
    writer.add(
        _records([{"index": 0, "path": "a", "map": "maps/a.npy", "status": "skipped", "problem": "bad"}])
    )
    assert not (tmp_path / rec.PARTS).exists()  # below the flush size: still in memory
    writer.add(_records([{"index": 1, "path": "b", "map": "maps/b.npy", "status": "ok", "score": 0.5}]))
    assert len(list((tmp_path / rec.PARTS).glob("scores-*.parquet"))) == 1
    writer.add(_records([{"index": 9, "path": "a", "map": "maps/a.npy", "status": "ok", "score": 0.7}]))
    writer.close()
    parts = sorted((tmp_path / rec.PARTS).iterdir())
    assert len(parts) == 2 and not any(p.name.endswith(".tmp") for p in parts)

    records = rec.read_parts(tmp_path, rec.SCORES, RECORD_SCHEMA)
    assert records.num_rows == 3
    inputs = pa.table(
        {"path": ["a", "b", "c"], "map": ["maps/a.npy", "maps/b.npy", "maps/c.npy"], "index": [0, 1, 2]}
    )
    joined = rec.join_records(inputs, records, ["path", "map"]).to_pylist()
    assert [(r["path"], r["status"], r["score"]) for r in joined] == [
        ("a", "ok", 0.7),  # retried after being skipped: the newest answer
        ("b", "ok", 0.5),
        ("c", None, None),  # never recorded
    ]
    assert [r["index"] for r in joined] == [0, 1, 2]  # the current list's order, not the records'


def test_a_damaged_part_is_named(tmp_path):
    (tmp_path / rec.PARTS).mkdir()
    (tmp_path / rec.PARTS / "scores-1-x.parquet").write_bytes(b"nope")
    with pytest.raises(InputError, match="scores-1-x.parquet: unreadable record"):
        rec.read_parts(tmp_path, rec.SCORES, RECORD_SCHEMA)


def test_scores_are_written_as_a_local_run_writes_them(tmp_path):
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "path": ["x/a.png", 'we"ird, name.png'],
            "score": [0.123456789, 0.9],
            "overlay": ["overlays/a.png", "overlays/b.png"],
            "map": ["maps/a.npy", "maps/b.npy"],
            "mask": ["masks/a.png", "masks/b.png"],
        }
    )
    rec.write_scores(tmp_path, table, threshold=0.5, masks=True, weights="random")
    with (tmp_path / "scores.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", "score", "decision", "overlay", "map", "mask", "weights"]
    assert rows[1] == [
        "x/a.png",
        "0.123457",
        "normal",
        "overlays/a.png",
        "maps/a.npy",
        "masks/a.png",
        "random",
    ]
    assert rows[2][:3] == ['we"ird, name.png', "0.900000", "anomalous"]
    parquet = pq.read_table(tmp_path / "scores.parquet")
    assert parquet.column_names == rows[0]
    assert parquet.column("score").to_pylist() == [0.123456789, 0.9]  # full precision
    rec.write_scores(tmp_path, table, threshold=None, masks=False, weights="pretrained")
    with (tmp_path / "scores.csv").open() as fh:
        assert next(csv.reader(fh)) == ["path", "score", "overlay", "map", "weights"]


def test_listing_is_one_scandir(tmp_path):
    (tmp_path / "maps").mkdir()
    for name in ("a.npy", "b.npy", ".a.npy.1234.tmp"):
        (tmp_path / "maps" / name).write_bytes(b"")
    (tmp_path / "maps" / "good").mkdir()
    (tmp_path / "maps" / "good" / "c.npy").write_bytes(b"")  # output names mirror input folders
    assert rec.listing(tmp_path, "maps") == {"maps/a.npy", "maps/b.npy", "maps/good/c.npy"}
    assert rec.listing(tmp_path, "masks") == set()
