"""Atomic writes: all or nothing, and the file mode an ordinary open() would give under the user's umask."""

import os
import stat

import pytest

from clipfusion.outputs.files import atomic_open, atomic_write_bytes, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_get_the_mode_of_an_ordinary_open_under_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.html", "<html></html>")
        atomic_write_bytes(tmp_path / "sub" / "map.npy", b"\x93NUMPY")
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "sub" / "map.npy").stat().st_mode) == expected


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "scores.csv"
    atomic_write_text(target, "old\n")
    with pytest.raises(KeyboardInterrupt), atomic_open(target) as fh:
        fh.write("half of the new")
        raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]
