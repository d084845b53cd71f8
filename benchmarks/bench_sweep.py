"""Time of `clipfusion sweep`: 100 grid points over a stored run of 200 images (target: under a minute on
2 cores).

The stored run is real: ``evaluate --save-maps`` with the tiny preset (random weights) at the paper's output
size of 256 on 200 synthetic test images (its native grids, 15×15 CLIP and 32×32 diffusion, are the paper
configuration's). Two grids of 100 points are timed, each a whole ``sweep`` call (load, fusion, every
metric, tables and plots):

* ``alpha_map`` (5) × ``sigma`` (0, 2, 4, 8) × ``alpha_score`` (5): 20 distinct fused maps, as an ablation
  of Eq. 4 / Eq. 9 would be;
* ``alpha_map`` (25 values) × ``sigma`` (4): 100 distinct fused maps, the worst case (every point needs its
  own pixel metrics over 13 M pixels).

    flock /tmp/clipfusion-heavy.lock .venv/bin/python benchmarks/bench_sweep.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_grid import machine
from clipfusion.config import load_preset
from clipfusion.evaluation import evaluate
from clipfusion.evaluation.sweep import sweep

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 60.0
GRIDS = {
    "alpha_map 5 × sigma 4 × alpha_score 5": {
        "alpha_map": [0.0, 0.25, 0.5, 0.75, 1.0],
        "sigma": [0.0, 2.0, 4.0, 8.0],
        "alpha_score": [0.0, 0.25, 0.5, 0.75, 1.0],
    },
    "alpha_map 25 × sigma 4 (100 distinct maps)": {
        "alpha_map": [round(i / 24, 4) for i in range(25)],
        "sigma": [0.0, 2.0, 4.0, 8.0],
    },
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--output-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="timed sweeps per grid (alternated)")
    ap.add_argument("--out", type=Path, default=RESULTS / "sweep_cpu.md", help="'-': print only")
    ap.add_argument(
        "--store", type=Path, help="keep the stored run (and its data) here; reused when it exists"
    )
    args = ap.parse_args(argv)
    from clipfusion.data import make_synthetic_dataset

    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    info = machine()
    load = [os.getloadavg()]
    timings = []
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp)
        run_dir = store / "run"
        start = time.perf_counter()
        if not list((run_dir / "maps").glob("*.npz")):
            root = make_synthetic_dataset(
                store / "data", categories=["metal_plate"], n_train=2, n_test=args.n_test, image_size=128
            )
            config = load_preset("tiny").replace(device="cpu", output_size=args.output_size, sigma=4.0)
            evaluate(
                "folder",
                root,
                run_dir,
                config=config,
                shots=[1],
                seeds=[0],
                save_maps=True,
                progress=False,
                log=lambda _m: None,
            )
        stored_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (run_dir / "maps").glob("*.npz"))
        print(
            f"stored run: {args.n_test} images in {stored_s:.0f} s, maps file {size / 1e6:.2f} MB", flush=True
        )
        for _ in range(args.repeats):
            for name, grid in GRIDS.items():
                wall, cpu = time.perf_counter(), time.process_time()
                result = sweep(run_dir, grid, out_dir=Path(tmp) / "sweep", log=lambda _m: None)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                timings.append(
                    {
                        "grid": name,
                        "points": len(result.points),
                        "seconds": wall,
                        "cpu_seconds": cpu,
                        "load": os.getloadavg()[0],
                        "check": result.check,
                    }
                )
                print(
                    f"{name}: {len(result.points)} points: {wall:.1f} s wall, {cpu:.1f} s CPU (all threads), "
                    f"load {os.getloadavg()[0]:.1f} (target < {TARGET_S:.0f} s)",
                    flush=True,
                )
                load.append(os.getloadavg())
    lines = [
        "# Time of `clipfusion sweep` (100 grid points, one stored run of 200 images)",
        "",
        "> Random-weight maps (tiny preset): timing only; the metric values mean nothing.",
        "",
        f"Command: `benchmarks/bench_sweep.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
        f"Run: {started} (UTC), git {info.get('git', '?')}  ",
        f"Load average at start / end: {', '.join(f'{x:.2f}' for x in load[0])} / "
        f"{', '.join(f'{x:.2f}' for x in load[-1])}",
        "",
        f"Stored run: {args.n_test} test images, output size {args.output_size} "
        f"({args.n_test * args.output_size**2 / 1e6:.1f} M pixels), 1-shot, maps file {size / 1e6:.2f} MB. "
        "Each time is one whole `sweep` call: loading, fusion, every metric, sweep.csv/md/json and the PNG "
        "plots.",
        "",
        "Wall time depends on what else the machine runs (the 1-minute load average is given: 2 means both "
        "cores busy with other work); CPU time (this process, all its threads) does much less.",
        "",
        "| grid | points | wall s | CPU s | load | < 60 s |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for t in timings:
        lines.append(
            f"| {t['grid']} | {t['points']} | {t['seconds']:.1f} | {t['cpu_seconds']:.1f} "
            f"| {t['load']:.1f} | "
            f"{'pass' if t['seconds'] < TARGET_S else 'FAIL'} |"
        )
    lines += [
        "",
        "## Machine",
        "",
        f"- CPU: {info.get('cpu')}, {info.get('logical_cores')} logical cores, torch threads "
        f"{info.get('torch_threads')}",
        f"- torch {info.get('torch')}, CPU capability {info.get('torch_cpu_capability')}",
        f"- torch.cpu.get_capabilities(): {json.dumps(info.get('torch_cpu_capabilities'))}",
        f"- lscpu flags: {' '.join(info.get('cpu_flags', []))}",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if str(args.out) != "-":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        payload = {
            "started": started,
            "machine": info,
            "load": load,
            "stored_s": stored_s,
            "timings": timings,
        }
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0 if all(t["seconds"] < TARGET_S for t in timings) else 1


if __name__ == "__main__":
    sys.exit(main())
