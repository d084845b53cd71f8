"""Time and memory of the pixel metrics on a benchmark-sized category, against scikit-learn.

500 synthetic anomaly maps of 256x256 (32.8 M float32 pixels, masks with elliptic blobs on about half the
images) are scored with ``clipfusion.metrics.pixel_metrics`` (AUROC, AP, F1-max and AUPRO from one sort) and,
in the same process, with scikit-learn's ``roc_auc_score`` + ``average_precision_score`` on the flattened data
(two metrics, two sorts) as the baseline. Peak resident memory is measured per phase by resetting the
kernel's high-water mark (``/proc/self/clear_refs``) before each one.

    .venv/bin/python benchmarks/bench_metrics.py            # writes benchmarks/results/metrics.md
    .venv/bin/python benchmarks/bench_metrics.py --repeat 1 --no-sklearn --out -
    .venv/bin/python benchmarks/bench_metrics.py --float64   # also time the float64 fallback
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import sklearn
from sklearn.metrics import average_precision_score, roc_auc_score

if __package__ in (None, ""):  # run as a script: import the package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.machine import flags_line, machine_info
from clipfusion.metrics import pixel_metrics
from clipfusion.runtime import process_memory, reset_peak_memory

RESULTS = Path(__file__).resolve().parent / "results" / "metrics.md"


def synthetic(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks with 1-3 elliptic blobs on every other image; maps = noise + a blurred bump over each blob."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    maps = rng.random((n, size, size), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(0, n, 2):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(3, size / 8, 2)
            d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            masks[i] |= d <= 1.0
            maps[i] += np.float32(rng.uniform(0.2, 1.0)) * np.exp(-d / 2, dtype=np.float32)
    return masks, maps


def measure(fn, repeat: int) -> tuple[list[float], int, object]:
    """Wall times of ``repeat`` calls, the peak RSS during them (bytes), and the last result."""
    reset_peak_memory()
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, process_memory().get("peak_rss", 0), result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="number of maps")
    ap.add_argument("--size", type=int, default=256, help="map side length")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of pixel_metrics")
    ap.add_argument("--no-sklearn", action="store_true", help="skip the scikit-learn baseline")
    ap.add_argument(
        "--float64",
        action="store_true",
        help="also time float64 maps that float32 cannot hold (the exact argsort fallback), once",
    )
    ap.add_argument("--out", default=str(RESULTS), help="markdown report path, '-' for none")
    args = ap.parse_args(argv)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    masks, maps = synthetic(args.n, args.size, seed=0)
    gen_s = time.perf_counter() - t0
    n_pix = maps.size
    data_mb = (maps.nbytes + masks.nbytes) / 2**20
    rss_data = process_memory().get("rss", 0)
    lines = [
        f"data: {args.n} maps of {args.size}x{args.size} = {n_pix / 1e6:.1f} M pixels, "
        f"{masks.mean() * 100:.2f} % anomalous; float32 maps + bool masks = {data_mb:.0f} MiB "
        f"(generated in {gen_s:.1f} s)",
        f"load average before the run: {load:.2f}",
        f"RSS before the metrics (interpreter, libraries, data): {rss_data / 2**20:.0f} MiB",
    ]
    for line in lines:
        print(line, flush=True)

    times, peak, ours = measure(lambda: pixel_metrics(masks, maps), args.repeat)
    ours_line = (
        f"pixel_metrics (AUROC, AP, F1-max, AUPRO; one sort): "
        f"{' / '.join(f'{t:.2f}' for t in times)} s (median {statistics.median(times):.2f} s); "
        f"peak RSS {peak / 2**20:.0f} MiB (+{(peak - rss_data) / 2**20:.0f} MiB over that)"
    )
    print(ours_line, flush=True)
    print("  " + ", ".join(f"{k} {v:.6f}" for k, v in ours.items()), flush=True)
    lines += [ours_line, "  " + ", ".join(f"{k} {v:.6f}" for k, v in ours.items())]

    if args.float64:
        maps64 = maps.astype(np.float64) + 1e-12  # 1e-12 is below float32 resolution: forces the fallback
        f64_times, f64_peak, f64 = measure(lambda: pixel_metrics(masks, maps64), 1)
        rss_64 = rss_data + maps64.nbytes
        del maps64
        f64_line = (
            f"pixel_metrics on float64 maps (+1e-12, exact float64 argsort fallback): {f64_times[0]:.2f} s; "
            f"peak RSS {f64_peak / 2**20:.0f} MiB (+{(f64_peak - rss_64) / 2**20:.0f} MiB over that "
            "and the caller's float64 maps); "
            f"max |diff| to float32 run {max(abs(f64[k] - ours[k]) for k in ours):.1e}"
        )
        print(f64_line, flush=True)
        lines.append(f64_line)

    if not args.no_sklearn:
        flat_m, flat_s = masks.ravel(), maps.ravel()  # views, no copy

        def baseline():
            return roc_auc_score(flat_m, flat_s), average_precision_score(flat_m, flat_s)

        sk_times, sk_peak, (sk_auroc, sk_ap) = measure(baseline, 1)
        sk_line = (
            f"scikit-learn roc_auc_score + average_precision_score (2 metrics, 2 sorts): "
            f"{sk_times[0]:.2f} s; "
            f"peak RSS {sk_peak / 2**20:.0f} MiB (+{(sk_peak - rss_data) / 2**20:.0f} MiB)"
        )
        ratio_line = (
            f"ratio scikit-learn / pixel_metrics (median): {sk_times[0] / statistics.median(times):.1f}x; "
            f"|AUROC diff| {abs(sk_auroc - ours['auroc']):.1e}, |AP diff| {abs(sk_ap - ours['ap']):.1e}"
        )
        for line in (sk_line, ratio_line):
            print(line, flush=True)
        lines += [sk_line, ratio_line]

    if args.out != "-":
        command = "python benchmarks/bench_metrics.py " + " ".join(argv if argv is not None else sys.argv[1:])
        machine = [
            f"- Machine: {flags_line(machine_info('cpu'))}, `nproc` = {os.cpu_count()}",
            f"- Python {platform.python_version()}, NumPy {np.__version__}, SciPy {scipy.__version__}, "
            f"scikit-learn {sklearn.__version__}",
            f"- run at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        ]
        text = "\n".join(
            [
                "# Metrics benchmark",
                "",
                "Latest output of `benchmarks/bench_metrics.py` (timings on a shared machine are noisy; the",
                "load average before the run is part of the output).",
                "",
                *machine,
                "",
                "```",
                command.strip(),
                "```",
                "",
                "```",
                *lines,
                "```",
                "",
            ]
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
