"""The comparison harness end to end (``--quick``: tiny preset), and its command line's refusals."""

from __future__ import annotations

import importlib.util
import json

import pytest
from benchmarks.run import main

from benchmarks import LABEL


def test_missing_baseline_is_one_clear_error_before_any_work(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "anomalib" else real(name, *a)
    )
    code = main(["--quick", "--results-dir", str(tmp_path), "--out", str(tmp_path / "r.md")])
    assert code == 2
    err = capsys.readouterr().err
    assert "needs anomalib" in err and "--no-winclip" in err and "Traceback" not in err
    assert not (tmp_path / "r.md").exists()


def test_gpu_run_without_cuda_stops_at_once(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--device", "cuda", "--results-dir", str(tmp_path)], prog="benchmarks/bench_gpu.py") == 2
    assert "no usable CUDA device" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("anomalib") is None, reason="anomalib (the `test` extra) is needed"
)
def test_quick_run_end_to_end(tmp_path):
    out, raw = tmp_path / "RESULTS.md", tmp_path / "speed_cpu.json"
    argv = ["--quick", "--results-dir", str(tmp_path), "--out", str(out), "--json", str(raw)]
    assert main(argv) == 0
    results = json.loads(raw.read_text())
    assert results["errors"] == []
    markdown = out.read_text()
    on = "no AMX" if not results["machine"]["amx"] else "AMX"
    for heading in (
        "## Summary",
        "## Targets (issue 12)",
        "## Machine",
        "### Measured compute peaks",
        "## Latency per image, batch 1",
        "## Throughput, batch 2",
        "## Time per stage, CLIPFusion fp32, 1-shot",
        "## Where the time goes inside the VAE encoder and the UNet",
        "## Each optimisation before and after",
        "## Peak memory",
        "### bfloat16 against float32",
    ):
        line = next((x for x in markdown.splitlines() if x.startswith(heading)), None)
        assert line is not None, heading
        if heading.startswith("## ") and heading not in ("## Machine",):
            assert on in line, heading  # the machine's flags beside every figure
    assert LABEL in markdown and "tiny" in markdown and "--quick" in markdown

    peaks = results["peaks"]
    assert set(peaks["matmul"]) == set(peaks["conv"]) == {"float32", "bfloat16"}
    comparison = results["comparison"]
    keys = [c["key"] for c in comparison["contenders"]]
    assert keys == [
        "clipfusion float32",
        "clipfusion bfloat16",
        "clipfusion auto",
        "winclip float32",
        "winclip bfloat16",
    ]
    auto = next(c for c in comparison["contenders"] if c["dtype"] == "auto")
    assert auto["resolved"] == results["machine"]["auto_dtype"].rsplit(": ", 1)[-1].split(" ")[0]
    timed = [c["key"] for c in comparison["contenders"] if c["timed"]]
    for entry in comparison["latency"]:
        assert set(entry["times"]) == set(timed) and all(v["median_s"] > 0 for v in entry["times"].values())
    stages = comparison["stages"]["clipfusion float32"]
    for stage in ("CLIP", "VAE", "UNet"):
        assert stages["stages"][stage]["seconds"] > 0 and stages["stages"][stage]["gflop"] > 0, stage
    assert stages["floor_fraction"] > 0
    flops = comparison["flops"]["clipfusion"]
    assert flops["total"]["conv"] > 0 and flops["total"]["matmul"] > 0
    assert comparison["auto"]["rows"] and comparison["profile"]["VAE"]["top"]

    variants = results["ablation"]["variants"]
    assert list(variants) == [
        "default",
        "no early exit",
        "no channels-last",
        "out-of-place activations",
        "no SDPA",
    ]
    assert variants["no early exit"]["map_max_abs_diff"] == 0.0
    # the variants run in what `auto` resolves to here: bfloat16 where the CPU measures it faster, whose own
    # rounding (not the optimisation) sets how far an explicit attention lands from the fused kernel
    tolerance = 1e-4 if results["ablation"]["dtype"] == "float32" else 1e-2
    for name in ("no channels-last", "out-of-place activations", "no SDPA"):
        assert variants[name]["map_max_abs_diff"] < tolerance, name
        assert variants[name]["map_pearson"] >= 0.999, name

    memory = {item["name"]: item for item in results["memory"]}
    assert set(memory) == {"float32", "bfloat16", "auto", "auto, before"}
    assert (
        memory["auto"]["target_gb"] == 5.0
        and memory["auto"]["resolved"]["diffusion"]["dtype"] == auto["resolved"]
    )
    for item in memory.values():
        assert item["peak_life_gb"] >= item["rss_after_load_gb"] > 0.1
    faith = results["faithfulness"]
    assert faith["bfloat16"]["anomaly_map"]["pearson"] >= 0.99
    assert faith["auto"]["anomaly_map"]["max_abs_diff"] == 0.0 or auto["resolved"] != "float32"

    # a GPU run's results, as bench_gpu.py writes them, become the GPU section of the CPU report
    gpu = json.loads(raw.read_text())
    gpu["settings"]["device"] = "cuda"
    gpu["machine"]["gpu"], gpu["machine"]["cuda"] = "Some GPU", "13.0"
    (tmp_path / "speed_cuda.json").write_text(json.dumps(gpu))
    assert main([*argv, "--render-only"]) == 0
    combined = out.read_text()
    assert "## GPU" in combined and "Some GPU (CUDA 13.0)" in combined.split("## GPU")[1]
