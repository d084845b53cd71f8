"""The speed harness (issue 6): a ``--quick`` run end to end on the tiny preset, and the pieces it trusts.

The end-to-end run checks that every section of the report is there with positive numbers and that the
stage times add up to the measured total (a probe that double-counts or loses a stage fails here). The unit
tests pin the FLOP formulas the harness adds for CPU attention kernels against torch's own counts of the
unfused computation, and the stage probe's promise to leave the detector exactly as it found it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from clipfusion import bench


def test_mha_fast_path_formula_equals_the_unfused_count():
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(3, 10, 64)
    # grad mode with weights returned: no fast path and no fused attention, plain linears and bmms
    with FlopCounterMode(display=False) as unfused:
        mha(x, x, x, need_weights=True)
    expected = unfused.get_total_flops()
    assert expected > 0
    assert bench._mha_flops((3, 10, 64), (3, 10, 64), (3, 10, 64), 64, 4) == expected
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=bench.flop_mapping()) as fast:
        mha(x, x, x, need_weights=False)
    assert fast.get_total_flops() == expected


def test_cpu_attention_is_counted_like_the_explicit_computation():
    q, k, v = (torch.randn(2, 4, 50, 16) for _ in range(3))
    with FlopCounterMode(display=False) as explicit:
        (q @ k.transpose(-1, -2) / 4).softmax(-1) @ v
    with FlopCounterMode(display=False, custom_mapping=bench.flop_mapping()) as fused:
        F.scaled_dot_product_attention(q, k, v)
    assert explicit.get_total_flops() > 0
    assert fused.get_total_flops() == explicit.get_total_flops()


class _Branch:
    """A CLIP branch whose ``encode`` calls ``window_embeddings``: both are CLIP stage methods."""

    def encode(self, x: int) -> int:
        time.sleep(0.001)
        return self.window_embeddings(x) + 1

    def window_embeddings(self, x: int) -> int:
        return x


def test_stage_probe_charges_outermost_calls_and_restores_everything():
    import clipfusion.detector as detector_module

    class Det:
        def __init__(self) -> None:
            self.clip, self.diffusion = _Branch(), None

    det, fuse = Det(), detector_module.fuse
    with bench.StageProbe(det, "cpu") as probe:
        assert det.clip.encode(1) == 2
    assert probe.calls["CLIP"] == 1  # the nested stage call is not charged twice
    assert probe.seconds["CLIP"] >= 0.001
    assert vars(det.clip) == {}  # the class methods are visible again
    assert detector_module.fuse is fuse
    assert probe.missing == []


def test_time_interleaved_gives_each_contender_the_same_round():
    seen: dict[str, list[int]] = {"a": [], "b": []}
    times = bench.time_interleaved(
        {"a": seen["a"].append, "b": seen["b"].append}, warmup=1, repeats=3, device="cpu"
    )
    assert seen["a"] == seen["b"] == [0, 1, 2, 3]
    assert [len(v) for v in times.values()] == [3, 3]


def test_pearson_edge_cases():
    x = np.linspace(0, 1, 20)
    assert bench.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert bench.pearson(np.zeros(5), np.zeros(5)) == 1.0
    assert bench.pearson(np.zeros(5), x[:5]) is None


@pytest.mark.slow
def test_speed_section_in_a_reduced_dtype_compares_with_the_float32_reference(tmp_path):
    """The path a GPU run takes for each dtype (dtype override, in-process float32 reference), on the CPU."""
    settings = bench.Settings(
        preset="tiny",
        shots=[1],
        repeats=1,
        warmup=0,
        batch=2,
        throughput_repeats=1,
        stage_repeats=1,
        faith_images=1,
        image_size=128,
        winclip=False,
        memory=False,
    )
    data = bench.make_inputs(tmp_path, n_references=1, n_queries=2, size=128)
    references, queries = bench.load_inputs(data)
    reference = bench.build_detector("tiny", bench.detector_overrides(settings, "float32"))
    reference.fit(bench.OBJECT, references[:1])
    faith_reference = bench.collect_outputs(reference, queries[:1])
    peaks = {"matmul": {"float32": 100.0, "bfloat16": 50.0}, "conv3x3": {"float32": 100.0, "bfloat16": 50.0}}
    out = bench.speed_section(
        settings, "bfloat16", references, queries, peaks, faith_reference, lambda _m: None
    )
    assert out["dtype"] == "bf16"
    assert out["stages"]["floor"]["UNet"]["dtype"] == "bfloat16"
    assert out["faithfulness"]["anomaly_map"]["pearson"] > 0.9
    assert out["throughput"]["clipfusion"]["images_per_s"] > 0 and "winclip" not in out["throughput"]
    assert "ratio" not in out["latency"][0]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("anomalib") is None, reason="anomalib (the `test` extra) is needed for WinCLIP"
)
def test_quick_run_end_to_end(tmp_path):
    out, raw = tmp_path / "RESULTS.md", tmp_path / "speed_cpu.json"
    argv = ["--quick", "--results-dir", str(tmp_path), "--out", str(out), "--json", str(raw)]
    assert bench.main(argv) == 0

    results = json.loads(raw.read_text())
    assert results["errors"] == []
    markdown = out.read_text()
    for heading in (
        "## Machine",
        "### Measured compute peaks",
        "### Latency per image, batch 1",
        "### Throughput, batch 2",
        "### Time per stage, 1-shot",
        "## Peak memory",
        "### Reduced-precision faithfulness: bfloat16",
        "## Each optimisation before and after",
    ):
        assert heading in markdown, heading
    assert bench.LABEL in markdown
    assert "tiny" in markdown and "--quick" in markdown

    assert all(v > 0 for row in results["peaks"].values() for v in row.values())
    assert all(v > 0 for key in ("probe_start", "probe_end") for v in results[key].values())
    assert "Machine speed probe" in markdown
    assert set(results["peaks"]["matmul"]) == {"float32", "bfloat16"}
    (speed,) = results["speed"]
    assert [entry["shots"] for entry in speed["latency"]] == [0, 1]
    for entry in speed["latency"]:
        assert entry["clipfusion"]["median_s"] > 0 and entry["winclip"]["median_s"] > 0
        assert entry["ratio"] == pytest.approx(entry["clipfusion"]["median_s"] / entry["winclip"]["median_s"])

    stages = speed["stages"]
    for stage in ("CLIP", "VAE", "UNet"):
        assert stages["seconds"][stage] > 0 and stages["flops"][stage] > 0, stage
    # one repeat: the stages partition the measured prediction exactly
    assert math.isclose(sum(stages["seconds"].values()), stages["total_s"], rel_tol=1e-6)
    assert sum(stages["flops"].values()) == stages["total_flops"]
    assert stages["overall"]["floor_fraction"] > 0
    assert stages["missing_stages"] == []
    assert speed["winclip_flops"]["flops"] > 0

    throughput = speed["throughput"]
    assert throughput["batch"] == 2
    assert throughput["clipfusion"]["images_per_s"] > 0 and throughput["winclip"]["images_per_s"] > 0

    # each optimisation switched off in turn: timed, and what it computes unchanged
    variants = results["ablation"]["variants"]
    assert list(variants) == ["default", "no early exit", "no channels-last", "no SDPA", "bfloat16"]
    assert all(row["median_s"] > 0 for row in variants.values())
    assert variants["no early exit"]["map_max_abs_diff"] == 0.0  # early exit: identical maps
    for name in ("no channels-last", "no SDPA"):
        assert variants[name]["map_max_abs_diff"] < 1e-4, name
    assert variants["bfloat16"]["map_pearson"] > 0.99

    memory = {item["config_dtype"]: item for item in results["memory"]}
    assert set(memory) == {"float32", "bfloat16"}
    for item in memory.values():
        assert item["peak_life_gb"] >= item["rss_after_load_gb"] > 0.1
        if item["hwm_reset"]:
            assert 0 < item["peak_inference_gb"] <= item["peak_life_gb"]
    faith = results["faithfulness"]["bfloat16"]
    assert set(faith) == {"score", "anomaly_map", "clip_L", "clip_V", "diff_L", "diff_V"}
    assert faith["anomaly_map"]["pearson"] > 0.9
    summary = markdown.split("## Machine")[0]
    assert (
        "## Summary" in summary and "CLIPFusion, 1-shot, ms/image" in summary and "peak RSS bf16" in summary
    )

    # a GPU run's results, as bench_gpu.py writes them, become the GPU section and summary columns
    gpu = json.loads(raw.read_text())
    gpu["settings"]["device"] = "cuda"
    gpu["machine"]["gpu"] = "Some GPU"
    gpu["speed"][0].update(
        dtype="fp16", vram={"load_gb": 1.0, "inference_b1_gb": 1.5, "inference_b16_gb": 3.0}
    )
    gpu["speed"][0]["faithfulness"] = faith
    (tmp_path / "speed_cuda.json").write_text(json.dumps(gpu))
    assert bench.main([*argv, "--render-only"]) == 0
    combined = out.read_text()
    assert "## GPU" in combined and "#### Peak VRAM (fp16" in combined
    assert "Some GPU, fp16" in combined.split("## Machine")[0]


def test_ablation_variants_restore_the_detector():
    from clipfusion.detector import CLIPFusion

    det = CLIPFusion.from_preset("tiny")
    diffusion = det.diffusion
    config, processors = diffusion.config, diffusion.unet.attn_processors
    for name, _ in bench.ABLATIONS:
        with bench._ablation_variant(det, name):
            if name == "no SDPA":
                kinds = {type(p).__name__ for p in diffusion.vae.attn_processors.values()}
                assert kinds == {"AttnProcessor"}
            if name == "no channels-last":
                assert not diffusion.config.channels_last
        assert diffusion.config is config
        assert {k: type(v) for k, v in diffusion.unet.attn_processors.items()} == {
            k: type(v) for k, v in processors.items()
        }
    conv = diffusion.vae.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == config.channels_last


def test_missing_baseline_is_one_clear_error_before_any_work(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "anomalib" else real(name, *a)
    )
    code = bench.main(["--quick", "--results-dir", str(tmp_path), "--out", str(tmp_path / "r.md")])
    assert code == 2
    err = capsys.readouterr().err
    assert "needs anomalib" in err and "--no-winclip" in err and "Traceback" not in err
    assert not (tmp_path / "r.md").exists()


def test_throughput_batch_goes_through_the_branches_in_one_piece():
    from PIL import Image

    from clipfusion.detector import CLIPFusion

    det = CLIPFusion.from_preset("tiny", clip__batch_size=2, diffusion__batch_size=4)
    seen = {"clip": [], "diffusion": []}
    for branch in det.branches:
        original = branch.features if branch.name == "clip" else branch.encode_latents
        spy = (lambda orig, name: lambda x, **kw: seen[name].append(len(x)) or orig(x, **kw))(
            original, branch.name
        )
        setattr(branch, "features" if branch.name == "clip" else "encode_latents", spy)
    images = [Image.new("RGB", (64, 64), (i, 2 * i, 3 * i)) for i in range(8)]
    det.fit("bottle").predict(images, batch_size=8)  # the benchmark's call: the whole batch at once
    assert seen == {"clip": [8], "diffusion": [8]}
    seen = {"clip": [], "diffusion": []}
    det.predict(images)  # no batch size: each branch's own default caps the batch (2 and 4 → min 2)
    assert seen == {"clip": [2, 2, 2, 2], "diffusion": [2, 2, 2, 2]}
    assert (det.clip.config.batch_size, det.diffusion.config.batch_size) == (2, 4)
