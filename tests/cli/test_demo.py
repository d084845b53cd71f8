"""`clipfusion demo`: offline, in minutes, every output labelled as a pipeline demonstration."""

import csv
import json

from PIL import Image

from clipfusion.cli import main


def test_demo_runs_offline_and_labels_every_output(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CLIPFUSION_WEIGHTS", raising=False)
    demo = tmp_path / "demo"
    assert main(["demo", "--out", str(demo), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "PIPELINE DEMONSTRATION" in captured.err
    assert "| **mean** |" in captured.out
    # every format that can carry the label carries it
    assert "random-weight" in (demo / "evaluation" / "summary.md").read_text()
    assert "PIPELINE DEMONSTRATION" in (demo / "report" / "report.html").read_text()
    results = json.loads((demo / "evaluation" / "results.json").read_text())
    assert results["weights"]["kind"] == "random" and "pipeline demonstration" in results["weights"]["note"]
    for table in (demo / "evaluation" / "results.csv", demo / "report" / "scores.csv"):
        with table.open() as fh:
            rows = list(csv.DictReader(fh))
        assert rows and {r["weights"] for r in rows} == {"random"}, table
    manifest = json.loads((demo / "report" / "manifest.json").read_text())
    assert manifest["weights"] == "random" and "pipeline demonstration" in manifest["weights_note"]
    config = json.loads((demo / "report" / "config.json").read_text())
    assert config["clip"]["weights"] == config["diffusion"]["weights"] == "random"
    with Image.open(next((demo / "report" / "overlays").rglob("*.png"))) as overlay:
        assert "pipeline demonstration" in overlay.text["clipfusion-weights"]
    # a second demo replaces the first one's report instead of refusing the folder
    assert main(["demo", "--out", str(demo), "--no-progress"]) == 0
