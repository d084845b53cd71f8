"""`clipfusion bench`: a user's configuration timed on their machine, without anomalib."""

import json

from clipfusion.cli import COMMANDS, bench, main


def test_bench_is_a_registered_command():
    assert bench in COMMANDS


def test_bench_times_stages_throughput_and_memory(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--repeats",
        "1",
        "--batch-size",
        "2",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "PIPELINE DEMONSTRATION" in printed.err  # random weights are labelled
    report = json.loads(out.read_text())
    assert report["resolved"]["diffusion"] == {"device": "cpu", "dtype": "float32"}
    assert {"CLIP image tower", "VAE encoder", "UNet", "diffusion maps", "fusion"} <= set(report["stages_s"])
    assert all(v >= 0 for v in report["stages_s"].values()) and report["stages_s"]["UNet"] > 0
    assert report["load_s"] > 0 and report["latency_s"] > 0 and report["images_per_s"] > 0
    assert report["batch_size"] == 2 and report["shots"] == 1
    assert report["peak_rss_gb"] is None or report["peak_rss_gb"] > 0.1
    # the batch-1 peak apart from the throughput batch's (what a README figure at batch 1 compares with)
    if report["peak_rss_gb"] is not None:
        assert 0.1 < report["peak_rss_batch1_gb"] <= report["peak_rss_gb"]
        assert "GB during inference at batch 1, " in printed.out and "up to batch 2" in printed.out
    # the stages add up to about the whole prediction (the same steps, timed one by one); one repeat of
    # sub-second calls on a shared machine: only the order of magnitude is checked (stage timers that are
    # not wired, summing to about 0, or that count the work many times over still fail)
    assert 0.1 < sum(report["stages_s"].values()) / report["latency_s"] < 10
    for text in ("per stage", "images/s at batch 2", "peak memory", "float32 on cpu"):
        assert text in printed.out, text


def test_bench_refuses_too_few_images(tmp_path, capsys):
    from fabricate import random_rgb, save_image

    image = save_image(tmp_path / "only.png", random_rgb(0, (64, 64)))
    assert main(["bench", "--preset", "tiny", "--images", str(image), "--shots", "1"]) == 2
    assert "needs at least 2" in capsys.readouterr().err


def test_bench_refuses_an_unwritable_json_path_before_measuring(tmp_path, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert main(["bench", "--preset", "tiny", "--json", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "--json names a folder" in err and "Traceback" not in err and "loaded in" not in err
