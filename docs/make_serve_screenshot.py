"""Makes docs/serve.jpg, the README's picture of the inspector page: a tiny random-weight detector (a pipeline
demonstration, as the page's banner says) fitted on the synthetic bottle caps, served on 127.0.0.1, and the
page in Debian's headless Chromium with the synthetic test images dropped in.

    PYTHONPATH=src python docs/make_serve_screenshot.py     # needs /usr/bin/chromium and playwright
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip


def main() -> None:
    from playwright.sync_api import sync_playwright

    from clipfusion.calibration import calibrate
    from clipfusion.data import make_synthetic_dataset
    from clipfusion.detector import CLIPFusion
    from clipfusion.serve.app import create_app
    from clipfusion.serve.pool import DetectorPool
    from clipfusion.serve.server import make_server

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_synthetic_dataset(root / "data", categories=["bottle_cap"], n_train=4, n_test=12, seed=3)
        cap = data / "bottle_cap"
        det = CLIPFusion.from_preset("tiny").fit("bottle cap", [cap / "train" / "good" / "000.png"])
        det.release_text_encoders()
        det.save(
            root / "bottle_cap", calibrate(det, sorted((cap / "train" / "good").glob("*.png"))[1:], 0.99)
        )
        # the test images under names that say what they are
        shown = []
        for path in sorted((cap / "test").rglob("*.png")):
            target = root / "upload" / f"{path.parent.name}_{path.stem}.png"
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(path.read_bytes())
            shown.append(str(target))

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = make_server(create_app(DetectorPool({"bottle_cap": root / "bottle_cap"})), "127.0.0.1", port)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        import httpx

        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                str(root / "profile"),
                executable_path="/usr/bin/chromium",
                headless=True,
                args=ARGS,
                viewport={"width": 1280, "height": 1000},
            )
            page = context.new_page()
            page.on("console", lambda m: print("console:", m.type, m.text))
            page.on("pageerror", lambda e: print("pageerror:", e))
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#detector option", state="attached")
            page.set_input_files("#files", shown)
            page.locator('.card[data-ready="true"]').nth(len(shown) - 1).wait_for(timeout=600_000)
            png = root / "page.png"
            page.screenshot(path=str(png), full_page=True)
            context.close()
        server.stop()
        thread.join(60)
        Image.open(png).convert("RGB").save(HERE / "serve.jpg", quality=82, optimize=True)
    print(HERE / "serve.jpg")


if __name__ == "__main__":
    main()
