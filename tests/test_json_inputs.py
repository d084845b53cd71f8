"""Every JSON file clipfusion reads (thresholds, a fitted detector, a weights or run manifest, results.json, a
sweep's inputs) answers a non-UTF-8 or malformed file with the same one-line error naming the file — the
reading goes through one function, :func:`clipfusion.files.read_json`."""

import json

import pytest

from clipfusion.errors import InputError

NOT_UTF8 = b'{"format": 1, "name": "caf\xe9"}'
MALFORMED = b'{"format": 1,'


def _thresholds(path):
    from clipfusion.thresholds import Thresholds

    file = path / "thresholds.json"
    return file, lambda: Thresholds.load(file)


def _fitted(path):
    from clipfusion import fitted

    return path / "detector.json", lambda: fitted.read(path)


def _weights_manifest(path):
    from clipfusion.models import weights

    return path / "manifest.json", lambda: weights.read_manifest(path)


def _run_manifest(path):
    from clipfusion.outputs.folders import OutputFolder

    return path / "manifest.json", lambda: OutputFolder(path, overwrite=True).check()


def _results(path):
    from clipfusion.evaluation.results import ResultStore

    return path / "results.json", lambda: ResultStore(path, {"config": {}}, resume=True)


READERS = {
    "thresholds": _thresholds,
    "fitted detector": _fitted,
    "weights manifest": _weights_manifest,
    "run manifest": _run_manifest,
    "results": _results,
}


@pytest.mark.parametrize("payload", [NOT_UTF8, MALFORMED], ids=["not-utf8", "malformed"])
@pytest.mark.parametrize("reader", list(READERS))
def test_a_bad_json_file_is_one_line_naming_it(tmp_path, reader, payload):
    file, read = READERS[reader](tmp_path)
    file.write_bytes(payload)
    with pytest.raises(InputError) as info:
        read()
    text = str(info.value)
    assert text.startswith(f"{file}: not valid JSON (") and "unreadable" in text, text
    assert "\n" not in text


def test_the_same_words_for_every_reader(tmp_path):
    """Apart from the file and what it should have been, the words are the same everywhere."""
    said = set()
    for reader in READERS:
        folder = tmp_path / reader.replace(" ", "_")
        folder.mkdir()
        file, read = READERS[reader](folder)
        file.write_bytes(NOT_UTF8)
        with pytest.raises(InputError) as info:
            read()
        said.add(str(info.value).replace(str(file), "FILE").split("; unreadable")[0])
    assert said == {"FILE: not valid JSON (not UTF-8 text: invalid continuation byte)"}


def test_a_good_file_still_reads(tmp_path):
    from clipfusion.thresholds import Thresholds

    path = Thresholds(0.5, 0.4).save(tmp_path / "t.json")
    assert json.loads(path.read_text())["image"] == 0.5
    assert Thresholds.load(path).pixel == 0.4
