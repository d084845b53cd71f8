"""Atomic writes: all or nothing, and the file mode an ordinary open() would give under the user's umask."""

import os
import stat

import pytest

from clipfusion.files import atomic_open, atomic_write_bytes, atomic_write_text


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


def test_read_json_answers_every_bad_file_with_one_line_naming_it(tmp_path):
    from clipfusion.errors import InputError
    from clipfusion.files import read_json

    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}', encoding="utf-8")
    assert read_json(good, "thing") == {"a": [1, 2]}
    cases = {
        "latin1.json": ("bytes", b'{"name": "caf\xe9"}', "not valid JSON (not UTF-8 text"),
        "broken.json": ("bytes", b'{"a": ', "not valid JSON (Expecting value"),
        "missing.json": (None, None, "cannot read the thing"),
        "folder.json": ("dir", None, "cannot read the thing"),
    }
    for name, (kind, payload, message) in cases.items():
        path = tmp_path / name
        if kind == "bytes":
            path.write_bytes(payload)
        elif kind == "dir":
            path.mkdir()
        with pytest.raises(InputError) as info:
            read_json(path, "thing", hint="make it again")
        text = str(info.value)
        assert text.startswith(f"{path}: ") and message in text and text.endswith("; make it again"), text
        assert "\n" not in text


def test_sha256_and_paths_told_from_names(tmp_path):
    import hashlib

    from clipfusion.files import looks_like_path, sha256_file

    payload = os.urandom(3 * (1 << 20) + 17)
    (tmp_path / "w.bin").write_bytes(payload)
    assert sha256_file(tmp_path / "w.bin", chunk=1 << 20) == hashlib.sha256(payload).hexdigest()
    assert looks_like_path("./model") and looks_like_path("~/m") and looks_like_path("a/b")
    assert looks_like_path("model.safetensors", (".safetensors",)) and not looks_like_path(
        "model.safetensors"
    )
    assert not looks_like_path("laion400m_e31", (".safetensors", ".pt"))


def test_a_private_temp_dir_removes_what_killed_processes_of_this_host_left(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys
    import tempfile

    from clipfusion.files import private_temp_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    left = tmp_path / f"clipfusion-fitted-{int(dead.stdout)}-abcd-{host}"  # a worker killed mid-load
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "detector.json").write_text("{}")
    running = tmp_path / f"clipfusion-fitted-{os.getpid()}-beef-{host}"
    running.mkdir()
    elsewhere = tmp_path / f"clipfusion-fitted-{int(dead.stdout)}-cafe-another-host"
    elsewhere.mkdir()
    new = private_temp_dir("clipfusion-fitted-")
    assert new.is_dir() and new.name.startswith(f"clipfusion-fitted-{os.getpid()}-")
    assert not left.exists() and running.is_dir() and elsewhere.is_dir()
