"""Inputs of a distributed run: folders expanded as a local run expands them, lists read with pyarrow, and
the same output names as a local run. No Ray, no model."""

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from clipfusion.data.checks import collect_images
from clipfusion.distributed.inputs import output_stems, resolve_inputs, with_output_names
from clipfusion.errors import InputErrors
from clipfusion.outputs.predictions import unique_stems


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for rel in (
        "a/b/x.png",
        "a/b-c/x.png",  # pathlib sorts by parts: a/b/… before a/b-c/…, unlike a string sort
        "a/B/y.JPG",
        "a/.cache/z.png",  # hidden folders are searched, hidden files are not
        "a/.hidden.png",
        "a/notes.txt",
        "a/b/x_2.png",  # a stem that the de-duplication of x.png would also produce
        "a/x.png",
        "a/q.tar.png",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"not decoded here")
    os.symlink(tmp_path / "a" / "b", tmp_path / "a" / "link")  # a linked folder is not followed
    return tmp_path


@pytest.mark.parametrize("given", ["a", "./a", "a/", "ABS"])
def test_a_folder_gives_the_files_paths_and_names_of_a_local_run(tree, given):
    given = str(tree / "a") if given == "ABS" else given
    table = resolve_inputs([given])
    files, problems = collect_images([given])
    assert not problems
    assert table.column("path").to_pylist() == [str(f) for f in files]
    assert table.column("source").to_pylist() == [os.path.abspath(f) for f in files]
    assert table.column("index").to_pylist() == list(range(len(files)))
    assert output_stems(table.column("path")) == unique_stems(files)
    named = with_output_names(table, masks=True).to_pylist()
    assert [r["map"] for r in named] == [f"maps/{n}.npy" for n in unique_stems(files)]
    assert [r["mask"] for r in named] == [f"masks/{n}.png" for n in unique_stems(files)]


def test_lists_name_paths_relative_to_their_own_folder(tree):
    (tree / "lists").mkdir()
    (tree / "lists" / "l.txt").write_text("# a comment\n../a/x.png\n\n  /abs/p.png  \nsub/with space.png\n")
    pacsv.write_csv(pa.table({"score": [1.0, 2.0], "path": ["1,2.png", "/abs/q.png"]}), tree / "l.csv")
    pq.write_table(pa.table({"id": [7], "path": ["r.png"]}), tree / "lists" / "l.parquet")
    table = resolve_inputs(["lists/l.txt", "l.csv", tree / "lists" / "l.parquet", "a/x.png"])
    assert table.column("path").to_pylist() == [
        "lists/../a/x.png",
        "/abs/p.png",
        "lists/sub/with space.png",
        "1,2.png",
        "/abs/q.png",
        f"{tree}/lists/r.png",
        "a/x.png",
    ]
    assert table.column("source").to_pylist()[:3] == [
        f"{tree}/lists/../a/x.png",
        "/abs/p.png",
        f"{tree}/lists/sub/with space.png",
    ]


def test_every_input_problem_is_reported_at_once(tree):
    (tree / "empty").mkdir()
    (tree / "urls.txt").write_text("s3://bucket/a.png\n")
    (tree / "nothing.txt").write_text("\n# only a comment\n")
    pacsv.write_csv(pa.table({"file": ["a.png"]}), tree / "nocol.csv")
    pq.write_table(pa.table({"path": [1, 2]}), tree / "ints.parquet")
    (tree / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputErrors) as caught:
        resolve_inputs(
            [
                "missing.png",
                "empty",
                "urls.txt",
                "nothing.txt",
                "nocol.csv",
                "ints.parquet",
                "broken.parquet",
                "s3://bucket/x.png",
                Path("gs://bucket/y.png"),  # as the command line hands it over: gs:/bucket/y.png
            ]
        )
    problems = caught.value.problems
    assert len(problems) == 9
    for name, words in [
        ("missing.png", "no such file or folder"),
        ("empty", "folder contains no images"),
        ("urls.txt", "lists URLs"),
        ("nothing.txt", "names no paths"),
        ("nocol.csv", "no 'path' column"),
        ("ints.parquet", "not text"),
        ("broken.parquet", "cannot read this list"),
        ("s3://bucket/x.png", "URLs are not supported"),
        ("gs:/bucket/y.png", "URLs are not supported"),
    ]:
        assert any(p.startswith(name + ":") and words in p for p in problems), (name, problems)


def test_a_million_listed_paths_resolve_without_a_slow_loop(tmp_path):
    """Not a timing test: it checks that a list this long goes through (the benchmark measures it)."""
    lines = "\n".join(f"d{i % 100}/img{i % 1000}.png" for i in range(200_000))
    (tmp_path / "big.txt").write_text(lines)
    table = with_output_names(resolve_inputs([tmp_path / "big.txt"]), masks=False)
    assert table.num_rows == 200_000
    maps = table.column("map")
    assert len(set(maps.to_pylist())) == 200_000  # 1000 files, each listed 200 times: made unique by suffixes
    assert maps[0].as_py() == "maps/d0/img0.npy" and maps[1000].as_py() == "maps/d0/img0_2.npy"


def test_unique_names_equal_the_local_runs_on_colliding_stems():
    import numpy as np

    rng = np.random.default_rng(0)
    alphabet = ["a", "a_2", "a_3", "a_2_2", "b", "a.b", "x/a"]
    paths = [f"d{rng.integers(5)}/{alphabet[i]}.png" for i in rng.integers(len(alphabet), size=400)]
    assert output_stems(pa.array(paths)) == unique_stems([Path(p) for p in paths])


def test_output_names_mirror_the_input_folders_instead_of_numbering_equal_names(tmp_path):
    # the deepest folder holding every input is cut off; below it, the folders stay in the name
    paths = ["/p/test/good/000.png", "/p/test/hole/000.png", "/p/test/hole/001.png", "/p/test/x.png"]
    assert unique_stems([Path(p) for p in paths]) == ["good/000", "hole/000", "hole/001", "x"]
    assert output_stems(pa.array(paths)) == ["good/000", "hole/000", "hole/001", "x"]
    # one folder: the bare stems, as before; the same stem with another suffix keeps its suffix; only a
    # file given twice is numbered
    assert unique_stems([Path("/q/a.png"), Path("/q/b.png")]) == ["a", "b"]
    named = ["/q/x.png", "/q/x.jpg", "/q/y.png", "/q/y.png"]
    assert unique_stems([Path(p) for p in named]) == ["x.png", "x.jpg", "y", "y_2"]
    # relative and dotted paths name the same files as their absolute forms
    (tmp_path / "a").mkdir()
    os.chdir(tmp_path)
    assert output_stems(pa.array(["a/../a/m.png", "./a/n.png"])) == ["m", "n"]


def test_a_walk_leaves_out_the_runs_own_folder_and_earlier_runs_as_a_local_run_does(tree):
    out = tree / "a" / "b" / "results"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "x.png").write_bytes(b"an overlay")
    earlier = tree / "a" / "old-run"
    (earlier / "overlays").mkdir(parents=True)
    (earlier / "overlays" / "x.png").write_bytes(b"an overlay")
    (earlier / "manifest.json").write_text('{"format": 1, "complete": true, "files": []}')
    table = resolve_inputs(["a"], exclude=[out])
    files, problems = collect_images(["a"], exclude=[out])
    assert not problems
    assert table.column("path").to_pylist() == [str(f) for f in files]
    assert not [f for f in files if "results" in f.parts or "old-run" in f.parts]
    # naming a run's folder itself is an error, not a silent pass over its pictures
    with pytest.raises(InputErrors, match="holds the outputs of a clipfusion run"):
        resolve_inputs([earlier])
    assert "holds the outputs of a clipfusion run" in collect_images([earlier])[1][0]
