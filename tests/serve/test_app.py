"""The API against a real server on 127.0.0.1 (uvicorn in a thread), serving two tiny fitted detectors.

Random-weight tiny models: these tests check the plumbing (same numbers as ``CLIPFusion.predict``, the error
for each bad input, auth, readiness), never detection quality.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from fabricate import random_rgb

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install 'clipfusion[serve]'")
pytest.importorskip("httpx", reason="the server tests need httpx")

from serving import files_payload, httpx, thread_server, wait_ready

TOKEN = "a-test-token-of-enough-length"
ORIGIN = "http://hmi.example"


@pytest.fixture(scope="module")
def served(fitted):
    """One pool of two detectors, loaded only when a test opens the gate; two servers share it: one open
    (no token, no CORS) and one with a token and CORS for ORIGIN."""
    from clipfusion.detector import CLIPFusion
    from clipfusion.serve.app import ServeSettings, create_app
    from clipfusion.serve.pool import DetectorPool, Limits

    gate = threading.Event()

    def loader(record):
        assert gate.wait(120), "the test never opened the loading gate"
        return CLIPFusion.load(record.path)

    pool = DetectorPool(
        {"cap": fitted.with_thresholds, "cap-zero": fitted.without_thresholds},
        Limits(max_wait_ms=5, max_queue=8),
        loader=loader,
    )
    open_settings = ServeSettings(max_upload_mb=0.5, max_images=4)
    closed_settings = ServeSettings(max_upload_mb=0.5, max_images=4, token=TOKEN, cors_origins=(ORIGIN,))
    with (
        thread_server(create_app(pool, open_settings)) as open_server,
        thread_server(create_app(pool, closed_settings, manage_pool=False)) as closed_server,
    ):
        yield {"open": open_server.url, "closed": closed_server.url, "gate": gate, "pool": pool}


@pytest.fixture(scope="module")
def url(served):
    served["gate"].set()
    wait_ready(served["open"])
    return served["open"]


def _predict(url, paths, name="cap", **params):
    return httpx.post(
        f"{url}/v1/detectors/{name}/predict", files=files_payload(paths), params=params, timeout=120
    )


def test_readiness_before_and_after_loading(served, fitted):
    base = served["open"]
    assert not served["gate"].is_set(), "this test must run before the models are loaded"
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    not_ready = httpx.get(f"{base}/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["ready"] is False
    assert set(not_ready.json()["detectors"].values()) <= {"waiting", "loading"}
    early = _predict(base, fitted.queries[:1])
    assert early.status_code == 503
    assert early.json() == {"error": "detector 'cap' is still loading"}
    assert early.headers["retry-after"] == "5"
    # the listing already describes the folders (read without loading a model)
    listing = httpx.get(f"{base}/v1/detectors").json()["detectors"]
    assert [d["name"] for d in listing] == ["cap", "cap-zero"]

    served["gate"].set()
    wait_ready(base, timeout=120)
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "detectors": {"cap": "ready", "cap-zero": "ready"}}


def test_the_listing_gives_config_thresholds_and_references(url, fitted):
    listing = {d["name"]: d for d in httpx.get(f"{url}/v1/detectors").json()["detectors"]}
    cap = listing["cap"]
    assert cap["state"] == "ready"
    assert cap["object_name"] == "bottle cap"
    assert cap["shots"] == 1
    assert cap["references"] == [str(fitted.queries[0].parent / "part_0.png")]
    assert cap["thresholds"]["image"] == fitted.thresholds.image
    assert cap["thresholds"]["pixel"] == fitted.thresholds.pixel
    assert cap["config"]["preset"] == "tiny"
    assert cap["weights"] == "random"
    assert cap["banner"].startswith("PIPELINE DEMONSTRATION")
    assert listing["cap-zero"]["thresholds"] is None
    assert httpx.get(f"{url}/v1/detectors/cap-zero").json()["name"] == "cap-zero"


def test_predict_equals_clipfusion_predict(url, fitted):
    from clipfusion.serve.encoding import decode_map

    response = _predict(url, fitted.queries)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["weights"] == "random"
    assert body["threshold"] == fitted.thresholds.image
    assert [r["file"] for r in body["results"]] == [p.name for p in fitted.queries]
    for result, expected, path in zip(body["results"], fitted.expected, fitted.queries, strict=True):
        assert abs(result["score"] - expected.score) <= 1e-6
        anomaly_map = decode_map(result["anomaly_map"])
        assert anomaly_map.dtype == np.float32
        np.testing.assert_array_equal(anomaly_map, expected.anomaly_map)  # base64 float32: exact
        assert result["decision"] == ("anomalous" if expected.score > fitted.thresholds.image else "normal")
        assert result["anomalous_pixels"] == pytest.approx(
            np.mean(expected.anomaly_map > fitted.thresholds.pixel)
        )
        overlay = Image.open(io.BytesIO(base64.b64decode(result["overlay_png"])))
        assert overlay.format == "PNG"
        assert overlay.size == Image.open(path).size
        assert "random weights" in overlay.text["clipfusion-weights"]
    # one image per request, on the other detector (no thresholds: no decision), without overlay
    single = _predict(url, fitted.queries[1:2], name="cap-zero", overlay="false").json()["results"][0]
    assert abs(single["score"] - fitted.expected[1].score) <= 1e-6
    assert single["decision"] is None
    assert "overlay_png" not in single
    assert np.abs(decode_map(single["anomaly_map"]) - fitted.expected[1].anomaly_map).max() <= 1e-6


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` pixels (a decompression bomb's header)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_each_bad_input_gets_its_status_and_one_line(url, fitted, tmp_path):
    good = fitted.queries[0].read_bytes()
    small = io.BytesIO()
    Image.fromarray(random_rgb(1, (16, 16))).save(small, format="PNG")
    endpoint = f"{url}/v1/detectors/cap/predict"

    def post(*files, url=endpoint, **kwargs):
        return httpx.post(url, files=[("images", f) for f in files] or None, timeout=60, **kwargs)

    png = "image/png"
    a = ("a.png", good, png)
    cases = [
        (post(("empty.png", b"", png)), 400, "empty.png: empty file (0 bytes)"),
        (post(("notes.txt", b"not an image", "text/plain")), 400, "notes.txt: not an image file"),
        (post(("cut.png", good[: len(good) // 2], png)), 400, "cut.png: truncated or corrupt image data"),
        (post(("tiny.png", small.getvalue(), png)), 400, "tiny.png: image too small (16×16 pixels"),
        (
            post(("bomb.png", _png_header_only(30000, 30000), png)),
            413,
            "bomb.png: image too large (30000×30000",
        ),
        (post(("big.png", good + b"\0" * 600_000, png)), 413, "request body too large"),
        (
            post(*[(f"{i}.png", good, png) for i in range(5)]),
            413,
            "too many images in one request (at most 4)",
        ),
        (post(a, data={"path": "/etc/passwd"}), 400, "unexpected form field 'path'"),
        (
            httpx.post(endpoint, content=good, headers={"content-type": png}),
            400,
            "send the images as multipart",
        ),
        (
            post(a, url=f"{url}/v1/detectors/nope/predict"),
            404,
            "no detector named 'nope' (this server has: cap,",
        ),
        (post(a, params={"vmin": "1"}), 400, "give vmin and vmax together"),
        (post(a, params={"map": "maybe"}), 400, "map:"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (message, response.text)
        body = response.json()
        assert list(body) == ["error"], body
        assert body["error"].startswith(message), (message, body)
        assert "\n" not in body["error"]
    # the body limit is checked while streaming too (no Content-Length)
    chunks = [b'--B\r\nContent-Disposition: form-data; name="images"; filename="s.png"\r\n\r\n'] + [
        b"\0" * 65536
    ] * 12
    streamed = httpx.post(
        endpoint, content=iter(chunks), headers={"content-type": "multipart/form-data; boundary=B"}
    )
    assert streamed.status_code == 413
    assert streamed.json()["error"] == "request body too large (over the limit of 0.5 MB)"
    # and the server keeps serving
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert _predict(url, fitted.queries[:1]).status_code == 200


def test_no_request_can_name_a_server_side_path(url):
    for path in ("/static/../../../../etc/passwd", "/static/..%2f..%2fetc%2fpasswd", "/static/app.js/../../x",
                 "/docs-assets/..%2f__init__.py", "/static/index.html"):  # fmt: skip
        response = httpx.get(url + path)
        assert response.status_code == 404, path
        assert "root:" not in response.text
    assert httpx.get(f"{url}/static/app.js").status_code == 200


def test_the_token_is_required_on_the_api_only_when_set(served, url):
    closed = served["closed"]
    missing = httpx.get(f"{closed}/v1/detectors")
    assert missing.status_code == 401
    assert missing.json() == {
        "error": "missing bearer token: send the header 'Authorization: Bearer <token>'"
    }
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.get(f"{closed}/v1/detectors", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    assert wrong.json()["error"].startswith("wrong bearer token")
    right = httpx.get(f"{closed}/v1/detectors", headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200
    assert len(right.json()["detectors"]) == 2
    # the page, its assets, the API page and the probes carry no data and stay open
    for path in ("/", "/static/app.js", "/healthz", "/readyz", "/openapi.json"):
        assert httpx.get(closed + path).status_code == 200, path
    # without a token configured, nothing is asked
    assert httpx.get(f"{url}/v1/detectors").status_code == 200


def test_cors_is_off_unless_asked(served, url):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}  # fmt: skip
    allowed = httpx.options(f"{served['closed']}/v1/detectors/cap/predict", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{served['closed']}/healthz", headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers
    off = httpx.get(f"{url}/v1/detectors", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in off.headers
    assert httpx.options(f"{url}/v1/detectors/cap/predict", headers=preflight).status_code in (404, 405)


def test_exported_thresholds_are_what_predict_thresholds_reads(url, fitted, tmp_path):
    from clipfusion.calibration import Thresholds

    for name, calibrated in (("cap", True), ("cap-zero", False)):
        response = httpx.post(f"{url}/v1/detectors/{name}/thresholds", json={"image": 0.5, "pixel": 0.25})
        assert response.status_code == 200, response.text
        path = tmp_path / f"{name}.json"
        path.write_text(response.text)
        loaded = Thresholds.load(path)
        assert (loaded.image, loaded.pixel) == (0.5, 0.25)
        assert loaded.object_name == "bottle cap"
        assert loaded.config["preset"] == "tiny"
        # values set by hand never sit beside a calibration's quantile, image count and files
        data = response.json()
        assert data["origin"] == "set by hand" and data["set_by_hand"] == ["image", "pixel"]
        assert not {"quantile", "n_images", "files"} & set(data)
        if calibrated:  # which calibrated values they replaced, and that calibration
            expected = fitted.thresholds
            assert data["set_from"] == {
                "image": expected.image,
                "pixel": expected.pixel,
                "quantile": expected.quantile,
                "n_images": 3,
                "files": list(expected.files),
            }
        else:
            assert data["set_from"] is None and loaded.quantile is None and loaded.n_images == 0


def test_thresholds_keep_what_was_not_moved_and_say_where_each_value_came_from(url, fitted):
    calibrated = fitted.thresholds
    one = httpx.post(
        f"{url}/v1/detectors/cap/thresholds",
        json={"image": calibrated.image + 0.01, "pixel": calibrated.pixel},
    ).json()
    assert one["pixel"] == calibrated.pixel and one["set_by_hand"] == ["image"]
    assert one["set_from"]["pixel"] == calibrated.pixel
    back = httpx.post(
        f"{url}/v1/detectors/cap/thresholds", json={"image": calibrated.image, "pixel": calibrated.pixel}
    ).json()
    assert back["origin"] == "calibration" and back["quantile"] == calibrated.quantile
    assert back["n_images"] == 3 and "set_from" not in back
    listing = httpx.get(f"{url}/v1/detectors/cap").json()["thresholds"]
    assert listing["origin"] == "calibration" and listing["set_by_hand"] == []

    refused = httpx.post(f"{url}/v1/detectors/cap/thresholds", json={"image": "x", "pixel": 0.1})
    assert refused.status_code == 400
    assert refused.json()["error"].startswith("image: ")
    huge = httpx.post(f"{url}/v1/detectors/cap/thresholds", content=b"[" + b"0," * 50_000 + b"0]")
    assert huge.status_code == 413
    assert huge.json() == {"error": "request body too large (over 64 KiB)"}


def test_predict_thresholds_accepts_the_export(url, fitted, tmp_path, capsys):
    from clipfusion.cli import main

    exported = httpx.post(f"{url}/v1/detectors/cap-zero/thresholds", json={"image": 0.123, "pixel": 0.2})
    path = tmp_path / "thresholds.json"
    path.write_text(exported.text)
    code = main(["predict", "--fitted", str(fitted.without_thresholds), "--thresholds", str(path),
                 str(fitted.queries[0]), "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    scores = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert scores[0].startswith("path,score,decision")
    expected = "anomalous" if fitted.expected[0].score > 0.123 else "normal"
    assert scores[1].split(",")[2] == expected


def test_the_api_page_is_fastapis_own_and_offline(url):
    page = httpx.get(f"{url}/docs")
    assert page.status_code == 200
    assert "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn." not in page.text and "https://" not in page.text.split("<body>")[0]
    schema = httpx.get(f"{url}/openapi.json").json()
    assert "/v1/detectors/{name}/predict" in schema["paths"]
    assert "EncodedMap" in schema["components"]["schemas"]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert httpx.get(f"{url}/docs-assets/{asset}").status_code == 200
