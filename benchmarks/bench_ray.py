"""Distributed batch inference on Ray Data (``predict --engine ray``) against a local ``predict --fitted``.

Measured, in one process, on one local Ray instance (``--cpus``, default all cores):

- images/s at 1 and 2 workers, per preset (``tiny``; ``random-full`` at the configuration's dtype);
- the per-image overhead of the Ray path against a local run: each contender runs on ``n1`` and ``n2``
  images and the *marginal* time per image, (T(n2) − T(n1)) / (n2 − n1), is compared, so that start-up
  (loading the models, starting actors) cancels out; the contenders alternate run by run;
- the driver's own work for a million inputs (no model): reading a list of paths and naming the outputs,
  the records, and the final ``scores.csv``/``scores.parquet``; and a folder walk against ``collect_images``.

From the measured per-worker rate it extrapolates, on paper and labelled as such, what N nodes would do.

    flock /tmp/clipfusion-heavy.lock python benchmarks/bench_ray.py                  # tiny and random-full
    python benchmarks/bench_ray.py --presets tiny --repeats 1 --out /tmp/ray.md      # a smoke run

Random-weight models: throughput and overhead only, never detection quality.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_load import machine  # noqa: E402

#: images per run (n1, n2) and batch size, per preset
SIZES = {"tiny": (8, 40, 4), "random-full": (2, 8, 2)}
#: available memory a random-full worker needs (fp32, loaded from a fit; see results/load_fitted.md)
FULL_WORKER_GB = 5.5


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def prepare(preset: str, root: Path, n: int) -> tuple[Path, list[Path]]:
    """Synthetic images and a fitted detector (tiny: 2-shot; random-full: zero-shot, to keep it short)."""
    from clipfusion.data import make_synthetic_dataset
    from clipfusion.detector import CLIPFusion
    from clipfusion.runtime import return_freed_memory

    make_synthetic_dataset(root, categories=["bottle_cap"], n_train=4, n_test=n, image_size=256, seed=3)
    files = sorted((root / "bottle_cap" / "test").rglob("*.png"))[:n]
    refs = sorted((root / "bottle_cap" / "train" / "good").iterdir())[:2] if preset == "tiny" else []
    detector = CLIPFusion.from_preset(preset, objects=["bottle cap"]).fit("bottle cap", refs)
    detector.save(root / "fitted")
    del detector
    gc.collect()
    return_freed_memory()
    return root / "fitted", files


def run_local(fitted: Path, files: list[Path], out: Path, batch: int) -> float:
    """What ``clipfusion predict --fitted`` does: load, score, write maps, overlays, masks and the report."""
    from clipfusion.detector import CLIPFusion
    from clipfusion.outputs.folders import OutputFolder
    from clipfusion.outputs.predictions import write_predictions
    from clipfusion.runtime import return_freed_memory

    start = time.perf_counter()
    detector = CLIPFusion.load(fitted)
    write_predictions(
        detector,
        files,
        OutputFolder(out),
        threshold=0.5,
        pixel_threshold=0.5,
        batch_size=batch,
        progress=False,
    )
    seconds = time.perf_counter() - start
    del detector
    gc.collect()
    return_freed_memory()
    return seconds


def run_ray(fitted: Path, files: list[Path], out: Path, batch: int, workers: int, cpus: int) -> float:
    from clipfusion import distributed

    start = time.perf_counter()
    summary = distributed.predict(
        fitted,
        files,
        out,
        workers=workers,
        cpus_per_worker=cpus // workers,
        batch_size=batch,
        threshold=0.5,
        pixel_threshold=0.5,
        progress=False,
    )
    assert summary.scored == len(files), summary
    return time.perf_counter() - start


def bench_preset(preset: str, repeats: int, cpus: int, work: Path) -> dict:
    n1, n2, batch = SIZES[preset]
    fitted, files = prepare(preset, work / preset, n2)
    contenders = [("local", None), ("ray, 1 worker", 1), ("ray, 2 workers", 2)]
    if preset == "random-full" and available_gb() < 2 * FULL_WORKER_GB + 1:
        print(f"only {available_gb():.1f} GB available: random-full with 2 workers left out", flush=True)
        contenders = contenders[:2]
    times: dict[str, dict[int, list[float]]] = {name: {n1: [], n2: []} for name, _ in contenders}
    count = 0
    for _ in range(repeats):
        for n in (n1, n2):
            for name, workers in contenders:
                count += 1
                out = work / f"{preset}-{count}"
                if workers is None:
                    seconds = run_local(fitted, files[:n], out, batch)
                else:
                    seconds = run_ray(fitted, files[:n], out, batch, workers, cpus)
                times[name][n].append(seconds)
                print(f"{preset} {name} {n} images: {seconds:.1f} s", flush=True)
    result = {"n1": n1, "n2": n2, "batch": batch, "runs": times, "contenders": {}}
    for name, _ in contenders:
        t1, t2 = statistics.median(times[name][n1]), statistics.median(times[name][n2])
        marginal = (t2 - t1) / (n2 - n1)
        result["contenders"][name] = {
            "seconds_n1": t1,
            "seconds_n2": t2,
            "marginal_s_per_image": marginal,
            "images_per_s": 1.0 / marginal if marginal > 0 else float("nan"),
            "end_to_end_images_per_s": n2 / t2,
        }
    local = result["contenders"]["local"]["marginal_s_per_image"]
    for entry in result["contenders"].values():
        entry["overhead_vs_local"] = entry["marginal_s_per_image"] / local - 1.0
    return result


def bench_driver(n: int, walk_files: int, work: Path) -> dict:
    """The driver's share of a large run, without any model: lists, names, records, final scores."""
    import numpy as np
    import pyarrow as pa

    from clipfusion.data.checks import collect_images
    from clipfusion.distributed import records as rec
    from clipfusion.distributed.inputs import resolve_inputs, with_output_names
    from clipfusion.distributed.worker import RECORD_SCHEMA

    out: dict[str, float] = {"paths": n, "walk_files": walk_files}
    listing = work / "million.txt"
    listing.write_text("\n".join(f"line{i % 997}/cam{i % 13}/{i % 1000:03d}.png" for i in range(n)) + "\n")
    start = time.perf_counter()
    table = with_output_names(resolve_inputs([listing]), masks=True)
    out["list_and_names_s"] = time.perf_counter() - start

    rng = np.random.default_rng(0)
    recs = pa.table(
        {
            "index": table.column("index"),
            "path": table.column("path"),
            "map": table.column("map"),
            "status": pa.array(["ok"] * n),
            "problem": pa.nulls(n, pa.string()),
            "score": rng.random(n),
            "map_min": rng.random(n),
            "map_max": rng.random(n) + 1,
            "worker": pa.array(["host:1"] * n),
        },
        schema=RECORD_SCHEMA,
    )
    folder = work / "records"
    start = time.perf_counter()
    writer = rec.PartsWriter(folder, rec.SCORES, RECORD_SCHEMA)
    for offset in range(0, n, 1000):  # as they arrive: one batch of records after another
        writer.add(recs.slice(offset, 1000))
    writer.close()
    out["records_write_s"] = time.perf_counter() - start
    start = time.perf_counter()
    joined = rec.join_records(table, rec.read_parts(folder, rec.SCORES, RECORD_SCHEMA), ["path", "map"])
    out["records_read_join_s"] = time.perf_counter() - start
    start = time.perf_counter()
    rec.write_scores(folder, joined, threshold=0.5, masks=True, weights="random")
    out["scores_files_s"] = time.perf_counter() - start

    tree = work / "tree"
    for i in range(walk_files):
        sub = tree / f"line{i % 50}" / f"cam{i % 7}"
        if i < 350:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:06d}.png").touch()
    start = time.perf_counter()
    walked = resolve_inputs([tree])
    out["walk_s"] = time.perf_counter() - start
    start = time.perf_counter()
    found, _ = collect_images([tree])
    out["collect_images_s"] = time.perf_counter() - start
    assert walked.column("path").to_pylist() == [str(f) for f in found]
    return out


def extrapolate(per_node: float) -> list[str]:
    lines = [
        "| nodes | images/s | a million images take |",
        "|---|---|---|",
    ]
    for nodes in (1, 4, 16, 64):
        rate = nodes * per_node
        lines.append(f"| {nodes} | {rate:.2f} | {1e6 / rate / 3600:.1f} h |")
    return lines


def report(results: dict, args: argparse.Namespace) -> str:
    lines = [
        "# Distributed batch inference on Ray Data (`predict --engine ray`)",
        "",
        "> random-init weights: throughput and overhead only, never detection quality.",
        "",
        f"Command: `python benchmarks/bench_ray.py --presets {' '.join(args.presets)} "
        f"--repeats {args.repeats}"
        + (f" --full-repeats {args.full_repeats}" if args.full_repeats else "")
        + "` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); one local Ray instance with "
        f"{results['cpus']} CPUs, float32 (the presets' dtype), medians of the alternating runs (repeats: "
        + ", ".join(f"{p} {r['repeats']}" for p, r in results["presets"].items())
        + "). "
        "Local = `predict --fitted` (torch on all cores); Ray with 1 worker = 1 actor holding every core; "
        "with 2 workers = 2 actors of 1 core. Both write every output (maps, overlays on the set's scale, "
        "masks, scores, report).",
        "",
        "Marginal time per image = (T(n2) − T(n1)) / (n2 − n1): start-up (loading the fit, starting Ray "
        "actors) cancels out; end to end = n2 / T(n2) with it.",
        "",
        "| preset | n1 → n2 (batch) | contender | marginal s/image | images/s | vs local "
        "| end to end images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, res in results["presets"].items():
        for name, c in res["contenders"].items():
            vs = "–" if name == "local" else f"{c['overhead_vs_local'] * 100:+.1f} %"
            lines.append(
                f"| {preset} | {res['n1']} → {res['n2']} ({res['batch']}) | {name} | "
                f"{c['marginal_s_per_image']:.3f} | {c['images_per_s']:.3f} | {vs} | "
                f"{c['end_to_end_images_per_s']:.3f} |"
            )
    lines += ["", "Every run (seconds): "]
    for preset, res in results["presets"].items():
        for name, runs in res["runs"].items():
            shown = "; ".join(f"{n} images: {', '.join(f'{s:.1f}' for s in ss)}" for n, ss in runs.items())
            lines.append(f"- {preset}, {name}: {shown}")
    d = results.get("driver")
    if d:
        lines += [
            "",
            f"## The driver's share of a large run ({d['paths']:,} inputs, no model)",
            "",
            "| step | seconds |",
            "|---|---|",
            f"| read a list of {d['paths']:,} paths, resolve them and name every output | "
            f"{d['list_and_names_s']:.2f} |",
            f"| keep {d['paths']:,} records as they arrive (Parquet parts) | {d['records_write_s']:.2f} |",
            f"| read them back and join them to the inputs (end of run, `--resume`) | "
            f"{d['records_read_join_s']:.2f} |",
            f"| write `scores.csv` and `scores.parquet` | {d['scores_files_s']:.2f} |",
            f"| walk a folder of {d['walk_files']:,} images (`os.scandir`) | {d['walk_s']:.2f} |",
            f"| the same folder with a local run's `collect_images` (pathlib) | "
            f"{d['collect_images_s']:.2f} |",
        ]
    if not results["presets"]:
        return "\n".join([*lines, "", *(f"- {line}" for line in machine()), ""])
    full = results["presets"].get("random-full") or next(iter(results["presets"].values()))
    name = "ray, 2 workers" if "ray, 2 workers" in full["contenders"] else "ray, 1 worker"
    node_rate = full["contenders"][name]["images_per_s"]
    preset = "random-full" if "random-full" in results["presets"] else next(iter(results["presets"]))
    lines += [
        "",
        "## On paper: N nodes (an extrapolation, not a measurement)",
        "",
        f"From the measured {preset} rate of this 2-core machine with {name} ({node_rate:.3f} images/s per "
        "node), assuming every node is like it, the cluster's file system keeps up and scaling is linear "
        "(the driver only handles one small record per image: see above):",
        "",
        *extrapolate(node_rate),
        "",
        "For GPU nodes the per-worker rate has to be measured on the GPU (`benchmarks/bench_gpu.py`; no GPU "
        "was lent to this project's machines so far). With R images/s per GPU worker, N nodes of G GPUs "
        "give about N × G × R / (1 + overhead) images/s, the overhead being the Ray path's measured above.",
        "",
        *(f"- {line}" for line in machine()),
        f"- memory available at the end: {available_gb():.1f} GB",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "random-full"], choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--full-repeats", type=int, help="repeats for random-full (default --repeats; each run loads it anew)"
    )
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--driver-paths", type=int, default=1_000_000)
    parser.add_argument("--walk-files", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ray.md")
    args = parser.parse_args()

    import ray

    results: dict = {"cpus": args.cpus, "presets": {}}

    def save() -> str:  # after every stage: a run cut short still leaves what it measured
        text = report(results, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        return text

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.driver_paths:
            (work / "driver").mkdir()
            results["driver"] = bench_driver(args.driver_paths, args.walk_files, work / "driver")
            print(results["driver"], flush=True)
            save()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            for preset in args.presets:
                repeats = args.full_repeats if preset == "random-full" and args.full_repeats else args.repeats
                results["presets"][preset] = bench_preset(preset, repeats, args.cpus, work)
                results["presets"][preset]["repeats"] = repeats
                save()
        finally:
            ray.shutdown()
    print(save())


if __name__ == "__main__":
    main()
