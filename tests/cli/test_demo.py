"""`clipfusion demo`: offline, in minutes, every output labelled as a pipeline demonstration."""

from clipfusion.cli import main


def test_demo_runs_offline_and_labels_its_output(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CLIPFUSION_WEIGHTS", raising=False)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "PIPELINE DEMONSTRATION" in captured.err
    assert "| **mean** |" in captured.out
    assert (tmp_path / "demo" / "report" / "report.html").exists()
    assert "random-weight" in (tmp_path / "demo" / "evaluation" / "summary.md").read_text()
