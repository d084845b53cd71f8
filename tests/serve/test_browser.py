"""The inspector page in a real browser: Debian's headless Chromium driven by Playwright, against a real
server on 127.0.0.1 (one tiny fitted detector, random weights: the page's plumbing, not detection quality).

One page session: open the page, upload two images, wait for their overlays, move the thresholds and watch
decisions and masks follow without a new request, open the large view, export, visit the API page, and
check from the browser's own request log that nothing was fetched from anywhere but the server.

Where no Chromium is installed (a laptop) the test skips with one line; CI sets CLIPFUSION_REQUIRE_BROWSER=1
(``.ci/run``), and there a missing browser fails it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install 'clipfusion[serve]'")
pytest.importorskip("httpx", reason="the server tests need httpx")

from serving import thread_server, wait_ready

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str:
    """Debian's Chromium, or a skip (a failure where CI requires the browser)."""
    wanted = os.environ.get("CLIPFUSION_CHROMIUM") or "/usr/bin/chromium"
    path = wanted if Path(wanted).is_file() else shutil.which("chromium") or ""
    problem = None
    if not path:
        problem = f"no Chromium at {wanted} nor on PATH (Debian: apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "Playwright for Python is not installed (pip install playwright)"
    if problem:
        if os.environ.get("CLIPFUSION_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required (CLIPFUSION_REQUIRE_BROWSER=1) but {problem}")
        pytest.skip(f"browser test skipped: {problem}")
    return path


def test_without_chromium_the_browser_test_skips_in_one_line_and_fails_where_required(monkeypatch, tmp_path):
    missing = tmp_path / "no-chromium"
    monkeypatch.setenv("CLIPFUSION_CHROMIUM", str(missing))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CLIPFUSION_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        _chromium()
    assert str(skipped.value) == (
        f"browser test skipped: no Chromium at {missing} nor on PATH (Debian: apt-get install chromium)"
    )
    monkeypatch.setenv("CLIPFUSION_REQUIRE_BROWSER", "1")  # what .ci/run sets
    with pytest.raises(pytest.fail.Exception) as failed:
        _chromium()
    required = "browser test required (CLIPFUSION_REQUIRE_BROWSER=1) but no Chromium"
    assert str(failed.value).startswith(required)
    assert "\n" not in str(failed.value)


@pytest.fixture(scope="module")
def server(fitted):
    from clipfusion.serve.app import create_app
    from clipfusion.serve.pool import DetectorPool

    pool = DetectorPool({"bottle_cap": fitted.with_thresholds})
    with thread_server(create_app(pool)) as srv:
        wait_ready(srv.url)
        yield srv.url


def _cards(page) -> list[dict]:
    out = []
    for card in page.query_selector_all(".card"):
        out.append(
            {
                "name": card.get_attribute("data-name"),
                "score": float(card.get_attribute("data-score")),
                "decision": card.get_attribute("data-decision"),
                "masked": int(card.get_attribute("data-masked")),
            }
        )
    return out


def _set_range(page, selector: str, value: float) -> float:
    """Move a slider as a user would end up (value, then the input event); returns where it landed (the
    browser snaps to the slider's step)."""
    page.fill(selector, repr(value))
    return float(page.input_value(selector))


def test_the_page_scores_two_images_and_rethresholds_them_in_the_browser(server, fitted, tmp_path):
    from playwright.sync_api import sync_playwright

    from clipfusion.calibration import Thresholds

    executable = _chromium()
    uploads = fitted.queries[:2]
    expected = {p.name: r.score for p, r in zip(fitted.queries, fitted.expected, strict=True)}
    requests: list[str] = []
    problems: list[str] = []

    def predict_calls() -> int:
        return sum("/predict" in u for u in requests)

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data folder
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            accept_downloads=True,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(server + "/")
            page.wait_for_selector("#detector option", state="attached")
            banner = page.locator("#banner")
            assert banner.is_visible()
            assert banner.inner_text().startswith("PIPELINE DEMONSTRATION: random-weight models")

            page.set_input_files("#files", [str(p) for p in uploads])
            page.locator('.card[data-ready="true"]').nth(1).wait_for(timeout=120_000)
            cards = _cards(page)
            assert sorted(c["name"] for c in cards) == sorted(p.name for p in uploads)
            for card in cards:  # what the server computed, as the page read it
                assert abs(card["score"] - expected[card["name"]]) <= 1e-6
            assert cards[0]["score"] >= cards[1]["score"]  # sorted by score
            high, low = cards[0]["score"], cards[1]["score"]
            assert high > low
            assert predict_calls() == 2  # one per image
            page.screenshot(path=str(tmp_path / "inspector-scored.png"), full_page=True)

            # the image threshold between the two scores, then above both: the higher one flips
            between = _set_range(page, "#image-threshold", (high + low) / 2)
            assert low < between < high
            assert [c["decision"] for c in _cards(page)] == ["anomalous", "normal"]
            assert float(page.get_attribute("#histogram", "data-threshold")) == pytest.approx(between)
            above = _set_range(page, "#image-threshold", high + (high - low))
            assert above > high
            assert [c["decision"] for c in _cards(page)] == ["normal", "normal"]
            assert "0 anomalous" in page.inner_text("#summary")

            # the pixel threshold redraws the masks: everything masked at the bottom, nothing at the top
            pixel_min = float(page.get_attribute("#pixel-threshold", "min"))
            pixel_max = float(page.get_attribute("#pixel-threshold", "max"))
            _set_range(page, "#pixel-threshold", pixel_min)
            assert all(c["masked"] > 0 for c in _cards(page))
            _set_range(page, "#pixel-threshold", pixel_max)
            assert all(c["masked"] == 0 for c in _cards(page))
            pixel = _set_range(page, "#pixel-threshold", pixel_min + 0.6 * (pixel_max - pixel_min))
            between = _set_range(page, "#image-threshold", (high + low) / 2)
            assert predict_calls() == 2  # re-deciding needed no new request

            # the large view: opacity and outline
            page.locator(".card").first.click()
            assert page.locator("#viewer").is_visible()
            _set_range(page, "#opacity", 0.8)
            assert "score" in page.inner_text("#viewer-info")
            page.screenshot(path=str(tmp_path / "inspector-viewer.png"))
            page.click("#viewer-close")

            # export: the CSV of what the page shows, and thresholds predict --thresholds reads
            with page.expect_download() as download:
                page.click("#export-csv")
            rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
            assert [r["file"] for r in rows] == [c["name"] for c in _cards(page)]
            assert [r["decision"] for r in rows] == ["anomalous", "normal"]
            assert {r["weights"] for r in rows} == {"random"}
            with page.expect_download() as download:
                page.click("#export-thresholds")
            saved = tmp_path / "thresholds.json"
            saved.write_text(Path(download.value.path()).read_text())
            thresholds = Thresholds.load(saved)
            assert thresholds.image == pytest.approx(between)
            assert thresholds.pixel == pytest.approx(pixel)
            assert thresholds.object_name == "bottle cap"
            assert json.loads(saved.read_text())["config"]["preset"] == "tiny"
            assert thresholds.by_hand == ("image", "pixel") and thresholds.calibrated is not None

            # back to the calibration, then one slider only: the other value stays exactly the calibrated
            # one (not snapped to the slider's step), and the file says which value was set by hand
            page.click("#reset-thresholds")
            moved = _set_range(page, "#image-threshold", (high + low) / 2)
            with page.expect_download() as download:
                page.click("#export-thresholds")
            one = json.loads(Path(download.value.path()).read_text())
            assert one["pixel"] == fitted.thresholds.pixel
            assert one["image"] == pytest.approx(moved)
            assert one["origin"] == "set by hand" and one["set_by_hand"] == ["image"]
            assert one["set_from"]["image"] == fitted.thresholds.image
            assert one["set_from"]["quantile"] == fitted.thresholds.quantile
            assert "quantile" not in one and "n_images" not in one

            page.screenshot(path=str(tmp_path / "inspector.png"), full_page=True)

            # FastAPI's own API page, also without a CDN
            page.goto(server + "/docs")
            page.wait_for_selector(".swagger-ui .opblock", timeout=60_000)
        finally:
            context.close()
    assert (tmp_path / "inspector.png").stat().st_size > 10_000
    outside = [u for u in requests if not (u.startswith(server + "/") or u.startswith(("blob:", "data:")))]
    assert outside == [], outside
    assert any(u.startswith(server + "/docs-assets/") for u in requests)
    assert problems == [], problems
    print(f"\nscreenshots in {tmp_path}")
