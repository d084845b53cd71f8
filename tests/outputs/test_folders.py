"""An output folder belongs to one run: checked before work, claimed through its manifest, and --overwrite
removes exactly the earlier run's files."""

import json

import pytest

from clipfusion.errors import InputError
from clipfusion.outputs.folders import OutputFolder, check_output_file


def test_a_new_folder_is_only_created_when_the_run_opens_it(tmp_path):
    folder = OutputFolder(tmp_path / "a" / "b")
    folder.check()
    assert not (tmp_path / "a").exists()
    folder.open(["scores.csv", "maps/x.npy"], command="predict")
    assert json.loads((tmp_path / "a/b/manifest.json").read_text())["complete"] is False
    folder.close()
    assert json.loads((tmp_path / "a/b/manifest.json").read_text())["complete"] is True


def test_overwrite_removes_the_listed_files_only(tmp_path):
    first = OutputFolder(tmp_path / "out")
    first.open(["scores.csv", "maps/x.npy", "maps/y.npy", "../outside.txt"])
    (tmp_path / "out" / "maps").mkdir()
    for rel in ("scores.csv", "maps/x.npy", "maps/y.npy"):
        (tmp_path / "out" / rel).write_text(rel)
    (tmp_path / "out" / "maps" / "mine.txt").write_text("keep")
    (tmp_path / "outside.txt").write_text("keep")  # a manifest never reaches outside its folder
    first.close()
    with pytest.raises(InputError, match="holds an earlier clipfusion run"):
        OutputFolder(tmp_path / "out").check()
    second = OutputFolder(tmp_path / "out", overwrite=True)
    second.open(["scores.csv"])
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["out/manifest.json", "out/maps/mine.txt", "outside.txt"]


def test_overwrite_removes_files_named_by_the_manifests_patterns_only(tmp_path):
    """A distributed run names its per-image files by pattern (a million names would not fit a manifest)."""
    first = OutputFolder(tmp_path / "out")
    first.open(["scores.csv"], patterns=["maps/*.npy", ".parts/*.parquet", "../*.txt", "/etc/*"])
    for rel in ("scores.csv", "maps/a.npy", "maps/b.npy", ".parts/p.parquet", "maps/notes.md"):
        (tmp_path / "out" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / rel).write_text(rel)
    (tmp_path / "keep.txt").write_text("keep")
    first.close()
    OutputFolder(tmp_path / "out", overwrite=True).open(["scores.csv"])
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["keep.txt", "out/manifest.json", "out/maps/notes.md"]
    assert not (tmp_path / "out" / ".parts").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("x"), "names an existing file"),
        (lambda p: (p.mkdir(), (p / "photo.jpg").write_text("x")), "holds no clipfusion run"),
        (
            lambda p: (p / "manifest.json").parent.mkdir() or (p / "manifest.json").write_text("{"),
            "unreadable",
        ),
    ],
)
def test_unusable_folders_are_one_clear_line(tmp_path, make, message):
    make(tmp_path / "out")
    with pytest.raises(InputError, match=message) as info:
        OutputFolder(tmp_path / "out", overwrite=True).check()
    assert "\n" not in str(info.value)


def test_a_path_below_a_file_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="afile is a file"):
        OutputFolder(tmp_path / "afile" / "out").check()
    with pytest.raises(InputError, match="afile is a file"):
        check_output_file(tmp_path / "afile" / "cfg.toml", "--save")
    with pytest.raises(InputError, match="names a folder"):
        check_output_file(tmp_path, "--save")
