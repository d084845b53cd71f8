"""Many products, one copy of the models: what `clipfusion serve` and `clipfusion fit` cost for N objects.

- **serve memory**: `clipfusion serve --fitted` with 1, 3 and 15 fitted objects, each server a fresh child
  process on 127.0.0.1; after `/readyz` and one request to each object, its resident set (VmRSS) and peak
  (VmHWM). Target: 15 objects ≤ 1.10× one object.
- **switching object**: in the server of 3 objects, requests alternate between objects and repeat one
  object; the latency of a request to another object than the previous one against a request to the same
  one (a switch loads nothing and copies nothing, so the difference is noise).
- **fit**: `clipfusion fit --refs-root` of N objects in one command (one load of the models) against N
  separate `clipfusion fit --object` commands, wall time, and whether the fitted folders are the same bytes.

Every figure comes from fresh processes, as a user's commands run.

    python benchmarks/bench_shared.py                                        # random-full, float32
    python benchmarks/bench_shared.py --preset tiny --counts 1 3 --out /tmp/s.md   # a smoke run

Random-weight models: memory and time of the shared models only, never detection quality.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GB = 1e9

#: fifteen product names (the MVTec-AD categories): what a production line might fit
PRODUCTS = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _status(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def make_references(root: Path, n: int) -> Path:
    """``root/refs/<product>/`` with one normal image each (the synthetic data set's textures, one per
    product, so that the objects' memory banks differ), and ``root/queries/`` to send."""
    from clipfusion.data import make_synthetic_dataset

    data = make_synthetic_dataset(
        root / "data", categories=["bottle_cap", "woven_fabric", "metal_plate"], n_train=6, n_test=2, seed=0
    )
    goods = sorted(
        p
        for c in ("bottle_cap", "woven_fabric", "metal_plate")
        for p in (data / c / "train" / "good").iterdir()
    )
    for i, name in enumerate(PRODUCTS[:n]):
        (root / "refs" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(goods[i % len(goods)], root / "refs" / name / "000.png")
    queries = root / "queries"
    queries.mkdir(exist_ok=True)
    for i, path in enumerate(sorted((data / "bottle_cap" / "test").rglob("*.png"))[:2]):
        shutil.copy(path, queries / f"{i}.png")
    return root / "refs"


def run(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("a") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=_env()).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {code}; see {log}")
    return time.perf_counter() - start


def bench_fit(args: argparse.Namespace, work: Path, refs: Path) -> dict[str, object]:
    clip = [sys.executable, "-m", "clipfusion", "fit", "--preset", args.preset, "-q", "--no-progress"]
    n = max(args.counts)
    together = run([*clip, "--refs-root", str(refs), "--out", str(work / "together")], work / "fit.log")
    alone = []
    for name in PRODUCTS[: args.separate or n]:
        image = refs / name / "000.png"
        command = [*clip, "--object", name, "--refs", str(image), "--out", str(work / "alone" / name)]
        alone.append(run(command, work / "fit.log"))
    same = all(
        (work / "together" / name / f).read_bytes() == (work / "alone" / name / f).read_bytes()
        for name in PRODUCTS[: len(alone)]
        for f in ("clip.safetensors", "diffusion.safetensors")
    )
    per_command = statistics.median(alone)
    return {
        "objects": n,
        "one_command_s": together,
        "separate_commands_measured": len(alone),
        "separate_command_median_s": per_command,
        "separate_commands_s": per_command * n if len(alone) < n else sum(alone),
        "separate_commands_extrapolated": len(alone) < n,
        "same_fitted_bytes": same,
    }


def serve(fitted: list[Path], queries: list[Path], log: Path, args: argparse.Namespace) -> dict[str, object]:
    command = [sys.executable, "-m", "clipfusion", "serve", "--host", "127.0.0.1", "--port", "0"]
    command += ["--batch-size", "1", "--fitted", *map(str, fitted)]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.monotonic() + args.timeout
        url = None
        while url is None:
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", log.read_text())
            url = found.group(1) if found else None
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.2)
        start = time.perf_counter()
        while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready:\n{log.read_text()}")
            time.sleep(0.5)
        ready_s = time.perf_counter() - start
        ready = _status(process.pid)
        payload = [("images", (queries[0].name, queries[0].read_bytes(), "image/png"))]

        def ask(name: str) -> float:
            begin = time.perf_counter()
            response = httpx.post(f"{url}/v1/detectors/{name}/predict", files=payload, timeout=args.timeout)
            if response.status_code != 200:
                raise RuntimeError(f"{name}: {response.status_code} {response.text}")
            return time.perf_counter() - begin

        names = [p.name for p in fitted]
        first = {name: ask(name) for name in names}
        after = _status(process.pid)
        switches: dict[str, list[float]] = {"same": [], "other": []}
        if len(names) > 1 and args.switch_rounds:
            previous = names[-1]
            order = [
                names[0],
                names[0],
                names[1],
                names[1],
                names[2 % len(names)],
                names[0],
            ] * args.switch_rounds
            for name in order:
                switches["same" if name == previous else "other"].append(ask(name))
                previous = name
        info = httpx.get(f"{url}/v1/detectors/{names[0]}", timeout=10).json()
        return {
            "objects": len(names),
            "ready_s": ready_s,
            "rss_ready_gb": ready["VmRSS"] / GB,
            "rss_after_requests_gb": after["VmRSS"] / GB,
            "peak_rss_gb": after["VmHWM"] / GB,
            "first_request_s": first,
            "switch_latency_s": switches,
            "shares_models_with": len(info.get("shares_models_with", [])),
        }
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="random-full")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 3, 15])
    parser.add_argument("--separate", type=int, help="separate fit commands to time (default: all)")
    parser.add_argument("--switch-rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--work", type=Path, help="keep the fitted folders and logs here")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "shared_models.md")
    args = parser.parse_args()
    if max(args.counts) > len(PRODUCTS):
        parser.error(f"at most {len(PRODUCTS)} objects")
    sys.path[:0] = [str(REPO / "src"), str(REPO)]
    from benchmarks.machine import flags_line, machine_info

    work = args.work or Path(tempfile.mkdtemp(prefix="clipfusion-bench-shared-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    refs = make_references(work, max(args.counts))
    queries = sorted((work / "queries").iterdir())
    print(f"fitting {max(args.counts)} objects in one command, then one by one …", flush=True)
    fit = bench_fit(args, work, refs)
    servers = []
    for count in args.counts:
        print(f"serving {count} objects …", flush=True)
        folders = [work / "together" / name for name in PRODUCTS[:count]]
        servers.append(serve(folders, queries, work / f"serve-{count}.log", args))
    machine = machine_info("cpu")
    base = servers[0]["rss_after_requests_gb"]
    result = {
        "command": "python benchmarks/bench_shared.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "preset": args.preset,
        "fit": fit,
        "serve": servers,
        "ratio_largest_to_one": servers[-1]["rss_after_requests_gb"] / base,
        "machine": machine,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Many products, one copy of the models ({args.preset} preset)",
        "",
        "> random-weight models: memory and time of the shared models, not detection quality.",
        "",
        f"Command: `{result['command']}` ({result['date']}); machine: {flags_line(machine)}. Every figure "
        "from fresh processes; a server per row, `--batch-size 1`, one 1-shot fitted folder per object.",
        "",
        "| objects served | RSS after /readyz, GB | RSS after one request to each, GB | peak RSS, GB | "
        "vs 1 object | ready in, s |",
        "|---|---|---|---|---|---|",
    ]
    for s in servers:
        lines.append(
            f"| {s['objects']} | {s['rss_ready_gb']:.2f} | {s['rss_after_requests_gb']:.2f} | "
            f"{s['peak_rss_gb']:.2f} | **{s['rss_after_requests_gb'] / base:.3f}×** | {s['ready_s']:.1f} |"
        )
    switching = next((s for s in servers if s["switch_latency_s"]["other"]), None)
    if switching is not None:
        same_s, other_s = switching["switch_latency_s"]["same"], switching["switch_latency_s"]["other"]
        same, other = statistics.median(same_s), statistics.median(other_s)
        lines += [
            "",
            f"Switching object ({switching['objects']} objects served): a request to another object than the "
            f"previous one {other:.2f} s, to the same one {same:.2f} s (medians of "
            f"{len(other_s)} and {len(same_s)}): "
            f"**{other - same:+.2f} s** for a switch, which loads and copies nothing.",
        ]
    extrapolated = " (the median of the measured ones × N)" if fit["separate_commands_extrapolated"] else ""
    lines += [
        "",
        f"Fitting {fit['objects']} objects: one `clipfusion fit --refs-root` {fit['one_command_s']:.1f} s; "
        f"{fit['objects']} separate `clipfusion fit` {fit['separate_commands_s']:.1f} s{extrapolated} "
        f"(**{fit['separate_commands_s'] / fit['one_command_s']:.1f}×** longer; "
        f"{fit['separate_commands_measured']} measured, median "
        f"{fit['separate_command_median_s']:.1f} s each). "
        f"The fitted folders are the same bytes either way: **{fit['same_fitted_bytes']}**.",
        "",
        f"Load average at the start {', '.join(f'{v:.2f}' for v in load_start)}, at the end "
        f"{', '.join(f'{v:.2f}' for v in result['load_average_end'])}.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
