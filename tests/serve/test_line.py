"""``clipfusion serve --fitted A B C``: several fitted objects on one copy of the models, each with its own
queue, answering concurrent requests exactly as each object alone (tiny random-weight models: plumbing)."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install 'clipfusion[serve]'")
pytest.importorskip("httpx", reason="the server tests need httpx")

from serving import files_payload, httpx, process_server, thread_server, wait_ready


@pytest.fixture(scope="module")
def line(fitted, tmp_path_factory):
    """Three fitted folders: the session's fit with and without thresholds, and another object (zero-shot),
    with what each predicts loaded alone."""
    from clipfusion.detector import CLIPFusion

    root = tmp_path_factory.mktemp("serve-line")
    CLIPFusion.from_preset("tiny", objects=["cable"]).fit("cable").save(root / "cable")
    folders = {"cap": fitted.with_thresholds, "cap-zero": fitted.without_thresholds, "cable": root / "cable"}
    expected = {
        name: CLIPFusion.load(path).predict(fitted.queries[:2], batch_size=1)
        for name, path in folders.items()
    }
    return folders, expected


def test_one_copy_of_the_models_serves_every_object_and_each_answers_as_alone(line, fitted):
    from clipfusion.serve.app import ServeSettings, create_app
    from clipfusion.serve.encoding import decode_map
    from clipfusion.serve.pool import DetectorPool, Limits

    folders, expected = line
    # one image a batch: what is compared is the sharing, not how a micro-batch happens to be composed
    pool = DetectorPool(folders, Limits(batch_size=1, max_wait_ms=20, max_queue=16))
    with thread_server(create_app(pool, ServeSettings())) as server:
        wait_ready(server.url)
        detectors = [slot.detector for slot in pool.slots.values()]
        tensors = [{id(p) for p in d.diffusion.unet.parameters()} for d in detectors]
        assert tensors[0] == tensors[1] == tensors[2]  # the very same UNet for all three
        info = httpx.get(f"{server.url}/v1/detectors/cable").json()
        assert sorted(info["shares_models_with"]) == ["cable", "cap", "cap-zero"]

        def ask(job):
            name, index = job
            payload = files_payload(fitted.queries[index : index + 1])
            response = httpx.post(f"{server.url}/v1/detectors/{name}/predict", files=payload, timeout=120)
            return name, index, response

        # concurrent requests to different objects, interleaved: each answered by its own fit
        jobs = [(name, i) for i in (0, 1) for name in ("cable", "cap", "cap-zero")] * 2
        with ThreadPoolExecutor(6) as executor:
            answers = list(executor.map(ask, jobs))
        for name, index, response in answers:
            assert response.status_code == 200, response.text
            (result,) = response.json()["results"]
            assert result["score"] == expected[name][index].score
            np.testing.assert_array_equal(
                decode_map(result["anomaly_map"]), expected[name][index].anomaly_map
            )


def test_a_folder_of_other_weights_fails_to_load_in_one_line(line, tmp_path):
    folders, _ = line
    other = tmp_path / "other"
    shutil.copytree(folders["cable"], other)
    record = json.loads((other / "detector.json").read_text())
    record["branches"]["diffusion"]["weights"]["fingerprint"] = "0" * 32  # fitted with other weights
    (other / "detector.json").write_text(json.dumps(record))
    args = ["--fitted", str(folders["cap"]), f"other={other}"]
    with process_server(args, tmp_path / "serve.log") as server:
        server.process.wait(180)
    log = (tmp_path / "serve.log").read_text()
    assert server.process.returncode == 2
    assert "detector 'other' could not be loaded: " in log and "the diffusion weights found" in log
    assert "Traceback" not in log


def test_a_folder_needing_other_networks_is_served_on_a_second_set_of_models(line, tmp_path):
    from clipfusion.detector import CLIPFusion
    from clipfusion.serve.pool import DetectorPool, Limits

    folders, _ = line
    half = (
        CLIPFusion.from_preset("tiny", dtype="bfloat16", objects=["cable"])
        .fit("cable")
        .save(tmp_path / "bf16")
    )
    pool = DetectorPool({"cap": folders["cap"], "cable": folders["cable"], "bf16": half}, Limits())
    try:
        pool.load_all()
        assert pool.ready
        groups = {name: slot.shares_models_with for name, slot in pool.slots.items()}
        assert groups == {"cap": ("cap", "cable"), "cable": ("cap", "cable"), "bf16": ("bf16",)}
        unets = {name: slot.detector.diffusion.unet for name, slot in pool.slots.items()}
        assert unets["cap"] is unets["cable"] and unets["bf16"] is not unets["cap"]
    finally:
        pool.close()
