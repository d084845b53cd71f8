"""``predict --engine ray`` on a real local Ray instance (started here, 2 CPUs, shared by the module) with the
tiny random-weight preset: plumbing and equality with a local run, never detection quality. The inputs: 42
synthetic images, a 16-bit PNG, a CMYK JPEG, an EXIF-rotated JPEG and a truncated file.

What must hold: the same scores and maps as a local predict (≤ 1e-6); a worker killed mid-run is replaced
and the outputs are identical to an uninterrupted run; unreadable inputs are listed in ``skipped.csv`` and
the rest scored; ``--resume`` scores only what is missing; a worker that cannot load the fit stops the
run with one line and leaves no folder behind. Teardown shuts Ray down and checks that no process it
started is left.
"""

import csv
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from clipfusion import distributed
from clipfusion.cli import main
from clipfusion.distributed import records
from clipfusion.distributed.run import ACTOR_PREFIX
from clipfusion.distributed.worker import RECORD_SCHEMA, ScoreBatch
from clipfusion.errors import ConfigError
from fabricate import png_16bit_rgb, random_rgb

pytestmark = pytest.mark.slow

THRESHOLDS = ["--threshold", "0.6", "--pixel-threshold", "0.2"]


def _descendants(pid: int) -> set[int]:
    """Processes below ``pid`` (from /proc: Ray's raylet, GCS and workers are children of the driver)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def cluster():
    before = _descendants(os.getpid())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = _descendants(os.getpid()) - before
    assert started, "ray.init started no process"
    yield ray
    ray.shutdown()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in started):
        time.sleep(0.2)
    left = sorted(p for p in started | (_descendants(os.getpid()) - before) if _alive(p))
    assert not left, f"processes left after ray.shutdown(): {left}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """42 synthetic images and an unreadable one; a tiny few-shot detector fitted and saved."""
    from clipfusion.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ray")
    make_synthetic_dataset(root, categories=["bottle_cap"], n_train=4, n_test=42, image_size=128, seed=1)
    refs = sorted((root / "bottle_cap" / "train" / "good").iterdir())[:2]
    argv = ["fit", "--object", "bottle cap", "--refs", *map(str, refs), "--preset", "tiny"]
    assert main([*argv, "--out", str(root / "fitted"), "-q"]) == 0
    # files a worker must read exactly as a local run does: 16-bit, CMYK, EXIF-rotated
    odd = root / "odd"
    odd.mkdir()
    (odd / "deep.png").write_bytes(png_16bit_rgb(random_rgb(5, (64, 48)).astype(np.uint16) * 257))
    Image.fromarray(random_rgb(6, (64, 48))).convert("CMYK").save(odd / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(random_rgb(7, (64, 48))).save(odd / "turned.jpg", exif=exif, quality=95)
    bad = root / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    inputs = [root / "bottle_cap" / "test", odd, bad]
    n = len(list((root / "bottle_cap" / "test").rglob("*.png"))) + 3
    assert n >= 40
    return {"root": root, "fitted": root / "fitted", "inputs": inputs, "bad": bad, "n": n}


def _predict_argv(data, out, *extra):
    return [
        "predict",
        "--fitted",
        str(data["fitted"]),
        *map(str, data["inputs"]),
        "--out",
        str(out),
        "--skip-bad",
        "--no-progress",
        *THRESHOLDS,
        *extra,
    ]


@pytest.fixture(scope="module")
def local_run(data):
    out = data["root"] / "local"
    assert main(_predict_argv(data, out)) == 0
    return out


@pytest.fixture(scope="module")
def ray_run(data, cluster):
    out = data["root"] / "ray"
    assert main(_predict_argv(data, out, "--engine", "ray", "--workers", "2", "--batch-size", "4")) == 0
    return out


def _rows(out: Path, name: str = "scores.csv") -> list[dict[str, str]]:
    with (out / name).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _outputs(out: Path) -> dict[str, bytes]:
    """Every output file but the manifest (it holds times) and the run's own records."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and records.PARTS not in p.parts
    }


def test_ray_scores_and_maps_equal_a_local_predict(data, local_run, ray_run):
    import pyarrow.parquet as pq

    local, remote = _rows(local_run), _rows(ray_run)
    assert len(remote) == data["n"] and len(local) == data["n"]
    assert list(remote[0]) == ["path", "score", "decision", "overlay", "map", "mask", "weights"]
    for a, b in zip(local, remote, strict=True):
        assert {k: v for k, v in a.items() if k != "score"} == {k: v for k, v in b.items() if k != "score"}
    exact = pq.read_table(ray_run / "scores.parquet").to_pylist()
    assert [r["path"] for r in exact] == [r["path"] for r in local]
    # local scores.csv rounds to 6 decimals: half of the 1e-6 budget is that rounding
    worst = max(abs(float(a["score"]) - b["score"]) for a, b in zip(local, exact, strict=True))
    assert worst <= 1e-6, worst
    worst_map = 0.0
    for row in local:
        a, b = np.load(local_run / row["map"]), np.load(ray_run / row["map"])
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        worst_map = max(worst_map, float(np.abs(a - b).max()))
        assert (ray_run / row["overlay"]).is_file() and (ray_run / row["mask"]).is_file()
    assert worst_map <= 1e-6, worst_map
    # the unreadable file: listed the same way by both engines, the rest scored
    assert _rows(ray_run, "skipped.csv") == _rows(local_run, "skipped.csv")
    assert [r["path"] for r in _rows(ray_run, "skipped.csv")] == [str(data["bad"])]
    # the same set of files (overlays on the set's colour scale, as locally)
    assert sorted(_outputs(ray_run)) == sorted([*_outputs(local_run), "scores.parquet"])
    manifest = json.loads((ray_run / "manifest.json").read_text())
    assert manifest["complete"] and manifest["engine"] == "ray" and manifest["scored"] == data["n"]
    page = (ray_run / "report.html").read_text()
    assert page.count("class='card'") == data["n"] and "class='hist'" in page
    assert "PIPELINE DEMONSTRATION" in page


def test_a_worker_killed_mid_run_is_replaced_and_the_outputs_are_identical(data, ray_run, cluster):
    out = data["root"] / "killed"
    outcome: dict = {}

    def run():
        try:
            outcome["summary"] = distributed.predict(
                data["fitted"],
                data["inputs"],
                out,
                workers=2,
                batch_size=4,
                threshold=0.6,
                pixel_threshold=0.2,
                progress=False,
            )
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline, names, done = time.monotonic() + 300, [], 0
    while time.monotonic() < deadline and thread.is_alive():
        names = [
            a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(ACTOR_PREFIX)
        ]
        done = len(list((out / "maps").rglob("*.npy"))) if (out / "maps").is_dir() else 0
        if len(names) == 2 and done >= 4:
            break
        time.sleep(0.1)
    assert len(names) == 2 and 4 <= done < data["n"], (names, done)  # both workers up, the run half done
    handles = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]
    pids = {ray.get(h.__ray_call__.remote(lambda self: os.getpid()), timeout=120) for h in handles}
    ray.kill(handles[0], no_restart=False)
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary.scored == data["n"] and [p for p, _ in summary.skipped] == [str(data["bad"])]
    # a process other than the two first workers scored part of the set: the replacement
    workers = set(records.read_parts(out, records.SCORES, RECORD_SCHEMA).column("worker").to_pylist())
    assert {int(w.rsplit(":", 1)[1]) for w in workers} - pids
    assert _outputs(out) == _outputs(ray_run)  # byte for byte: scores, maps, masks, overlays, report


def test_resume_scores_only_the_inputs_whose_outputs_are_incomplete(data, ray_run, cluster):
    out = data["root"] / "resumed"
    shutil.copytree(ray_run, out)
    rows = _rows(ray_run)
    for row in rows[:3]:
        (out / row["map"]).unlink()
    (out / rows[5]["overlay"]).unlink()
    (out / "scores.csv").unlink()
    summary = distributed.predict(
        data["fitted"],
        data["inputs"],
        out,
        resume=True,
        workers=2,
        batch_size=4,
        threshold=0.6,
        pixel_threshold=0.2,
        progress=False,
    )
    # the batches holding the 3 incomplete images (the first 4) and the unreadable one (the last, with the
    # images before it in its batch) are scored again, whole, so every image meets the same neighbours as
    # before and the bytes are the same; no other batch is
    n = data["n"]  # the unreadable file is input number n (0-based), after the n readable ones
    assert summary.resumed == n - 3
    assert summary.scored_now == 4 + (n - n // 4 * 4) and summary.workers == 2
    assert _outputs(out) == _outputs(ray_run)
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    # resuming another run's settings is refused before any work
    with pytest.raises(Exception, match="the earlier run used another threshold"):
        distributed.predict(
            data["fitted"], data["inputs"], out, resume=True, threshold=0.7, pixel_threshold=0.2
        )


def test_a_worker_that_cannot_load_the_fit_stops_the_run_in_one_line(data, cluster, tmp_path):
    fitted = tmp_path / "fitted"
    shutil.copytree(data["fitted"], fitted)
    record = json.loads((fitted / "detector.json").read_text())
    record["branches"]["clip"]["weights"]["fingerprint"] = "0" * 64  # not the weights the workers find
    (fitted / "detector.json").write_text(json.dumps(record))
    images = sorted((data["root"] / "bottle_cap" / "test" / "good").iterdir())[:2]
    with pytest.raises(
        ConfigError, match=r"^a Ray worker failed: .*the clip weights found .* are not the ones"
    ) as e:
        distributed.predict(fitted, images, tmp_path / "out", progress=False)
    assert str(e.value).startswith(f"a Ray worker failed: {fitted}: ") and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # a run that could not start leaves no folder


def test_per_image_colour_scales_are_drawn_while_scoring(data, cluster, tmp_path):
    from clipfusion.data import load_image
    from clipfusion.outputs import report

    images = sorted((data["root"] / "bottle_cap" / "test" / "good").iterdir())[:3]
    summary = distributed.predict(data["fitted"], images, tmp_path / "out", normalize="image", progress=False)
    assert summary.scored == 3 and summary.workers == 1
    assert not list((tmp_path / "out" / records.PARTS).glob("overlays-*"))  # no second pass
    for row in _rows(tmp_path / "out"):
        anomaly_map = np.load(tmp_path / "out" / row["map"])
        heat = report.normalise(anomaly_map, float(anomaly_map.min()), float(anomaly_map.max()))
        expected = np.asarray(report.overlay(load_image(row["path"]), heat))
        with Image.open(tmp_path / "out" / row["overlay"]) as drawn:
            np.testing.assert_array_equal(np.asarray(drawn.convert("RGB")), expected)


class CrashOnPoison(ScoreBatch):
    """A worker process that dies (as on a segfault or the OOM killer) whenever its batch holds a file
    named ``poison``."""

    def __call__(self, batch):
        if any("poison" in path for path in batch.column("path").to_pylist()):
            os._exit(1)
        return super().__call__(batch)


def test_a_batch_that_kills_its_worker_on_every_try_is_listed_and_the_run_goes_on(
    data, cluster, tmp_path, monkeypatch
):
    from ray import cloudpickle

    from clipfusion.distributed import run as run_module

    good = sorted((data["root"] / "bottle_cap" / "test" / "good").iterdir())[:5]
    poison = tmp_path / "poison.png"
    shutil.copy(good[0], poison)
    monkeypatch.setattr(run_module, "ScoreBatch", CrashOnPoison)
    monkeypatch.setattr(run_module, "MAX_TASK_RETRIES", 1)  # one retry: the worker dies twice
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the workers cannot import this test module
    try:
        summary = distributed.predict(
            data["fitted"], [*good[:4], poison, good[4]], tmp_path / "out", batch_size=2, progress=False
        )
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert summary.scored == 4
    # the whole batch (poison.png and its neighbour) is listed, not scored; every other batch is
    assert [Path(p).name for p, _ in summary.failed] == ["poison.png", good[4].name]
    assert all("its batch failed on every try (2 workers died on it)" in line for _, line in summary.failed)
    assert [r["path"] for r in _rows(tmp_path / "out", "skipped.csv")] == [str(poison), str(good[4])]
    assert len(_rows(tmp_path / "out")) == 4


def test_without_skip_bad_the_rest_is_scored_and_the_exit_status_names_the_bad_file(
    data, cluster, tmp_path, capsys
):
    good = sorted((data["root"] / "bottle_cap" / "test" / "good").iterdir())[:2]
    argv = ["predict", "--fitted", str(data["fitted"]), *map(str, good), str(data["bad"])]
    assert main([*argv, "--engine", "ray", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"unreadable: {data['bad']}: " in err and "add --skip-bad to accept that" in err
    assert "Traceback" not in err
    # the scores come from random weights, and the Ray route says so as the local one does
    assert "clipfusion: warning: PIPELINE DEMONSTRATION: random-weight models (tiny preset)" in err
    assert [r["path"] for r in _rows(tmp_path / "out")] == list(map(str, good))
    assert [r["path"] for r in _rows(tmp_path / "out", "skipped.csv")] == [str(data["bad"])]


def test_several_objects_on_workers_holding_one_copy_of_the_models(data, cluster, tmp_path):
    """``predict --fitted A B --engine ray``: every row scored by its own object, each object's folder the
    single-object Ray run of its inputs, byte for byte (the same batches, the same maps)."""
    second = tmp_path / "second"
    shutil.copytree(data["fitted"], second)  # another object's fit (the same state, under another name)
    mixed = tmp_path / "mixed"
    images = sorted((data["root"] / "bottle_cap" / "test").rglob("*.png"))
    for name, part in (("bottle_cap", images[:5]), ("second", images[5:8])):
        (mixed / name).mkdir(parents=True)
        for i, path in enumerate(part):
            shutil.copy(path, mixed / name / f"{i:03d}.png")
    out = tmp_path / "line"
    summary = distributed.predict_line(
        {"bottle_cap": data["fitted"], "second": second},
        [mixed],
        out,
        workers=2,
        batch_size=2,
        progress=False,
    )
    assert summary.scored == 8 and not summary.skipped and not summary.failed
    rows = _rows(out)
    assert [r["object"] for r in rows] == ["bottle_cap"] * 5 + ["second"] * 3
    assert all((out / r["map"]).is_file() and (out / r["overlay"]).is_file() for r in rows)
    alone = tmp_path / "alone"
    distributed.predict(data["fitted"], [mixed / "bottle_cap"], alone, batch_size=2, progress=False)
    mine = {k: v for k, v in _outputs(out / "bottle_cap").items() if k != "report.html"}
    theirs = {k: v for k, v in _outputs(alone).items() if k != "report.html"}
    assert mine == theirs
    assert json.loads((out / "manifest.json").read_text())["objects"] == ["bottle_cap", "second"]
    # a list naming an unknown object stops before Ray is asked for anything, in one line per row
    listing = tmp_path / "list.csv"
    listing.write_text(f"path,object\n{images[0]},bottle_cap\n{images[1]},cable\n")
    with pytest.raises(Exception, match="names the object 'cable', which no fitted folder is"):
        distributed.predict_line({"bottle_cap": data["fitted"], "second": second}, [listing], tmp_path / "x")
    assert not (tmp_path / "x").exists()
