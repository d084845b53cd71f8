"""`clipfusion serve` under load: micro-batched throughput against a one-at-a-time loop, and what the load
does to the answers, the log and the memory.

One fitted detector is served by the real command in a child process on 127.0.0.1. Each round runs, against
the same server:

- **one at a time**: one client sends ``--sequential`` requests of one image each, back to back (each
  request is a batch of one);
- **concurrent**: ``--clients`` clients (default 32) send ``--requests`` requests each (default 8), one image
  each, back to back, so the server's worker batches them (up to ``--batch-size`` images or
  ``--max-wait-ms``); a 503 is counted and retried after its ``Retry-After``.

Rounds alternate the two, so that the machine's drift hits both; the ratio is taken per round. Every response
must be 200 or 503, the server's log must hold no error, and its resident set after the concurrent phase is
compared with before (after a warm-up).

    flock /tmp/clipfusion-heavy.lock python benchmarks/bench_serve.py                    # tiny, 2 rounds
    python benchmarks/bench_serve.py --rounds 1 --clients 8 --requests 2 --out /tmp/s.md  # a smoke run

Random-weight models: throughput and memory of the serving path only, never detection quality.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def machine() -> dict[str, object]:
    import platform

    import torch

    flags: set[str] = set()
    model = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
    get = getattr(torch.cpu, "get_capabilities", None)
    found = get() if get is not None else {}
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "lscpu_flags": [f for f in wanted if f in flags],
        "torch": torch.__version__,
        "torch_cpu_capabilities": sorted(k for k, v in found.items() if v is True),
        "python": platform.python_version(),
    }


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def fit_detector(preset: str, root: Path) -> tuple[Path, list[Path]]:
    """A 1-shot fitted detector on the synthetic bottle caps, and the test images to send."""
    from clipfusion.data import make_synthetic_dataset
    from clipfusion.detector import CLIPFusion

    data = make_synthetic_dataset(root / "data", categories=["bottle_cap"], n_train=2, n_test=12, seed=0)
    category = data / "bottle_cap"
    detector = CLIPFusion.from_preset(preset, objects=["bottle cap"])  # text encoders freed before the UNet
    detector.fit("bottle cap", [category / "train" / "good" / "000.png"])
    folder = detector.save(root / "fitted")
    del detector
    images = sorted((category / "test").rglob("*.png"))
    return folder, images


def start_server(folder: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "clipfusion", "serve", "--fitted", f"cap={folder}"]
    command += ["--host", "127.0.0.1", "--port", "0", "--max-wait-ms", str(args.max_wait_ms)]
    command += ["--max-queue", str(args.max_queue)]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while True:
        found = re.search(r"running on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            url = found.group(1)
            break
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not become ready:\n{log.read_text()}")
        time.sleep(0.5)
    return process, url


async def clients_run(url: str, images: list[Path], clients: int, per_client: int) -> dict[str, object]:
    payloads = [[("images", (p.name, p.read_bytes(), "image/png"))] for p in images]
    codes: list[int] = []
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(c: int) -> None:
            for r in range(per_client):
                payload = payloads[(c * per_client + r) % len(payloads)]
                for _attempt in range(20):  # bounded retries after 503
                    start = time.perf_counter()
                    response = await client.post("/v1/detectors/cap/predict", files=payload)
                    codes.append(response.status_code)
                    if response.status_code != 503:
                        latencies.append(time.perf_counter() - start)
                        break
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one(c) for c in range(clients))), timeout=3600)
        seconds = time.perf_counter() - start
    ok = codes.count(200)
    latencies.sort()
    return {
        "clients": clients,
        "requests_per_client": per_client,
        "seconds": seconds,
        "images_per_second": ok / seconds,
        "codes": {str(code): codes.count(code) for code in sorted(set(codes))},
        "latency_p50_s": latencies[len(latencies) // 2],
        "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--sequential", type=int, default=32, help="requests of the one-at-a-time loop")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_load.md")
    args = parser.parse_args()

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("fitting the detector …", flush=True)
        folder, images = fit_detector(args.preset, root)
        log = root / "server.log"
        process, url = start_server(folder, args, log)
        try:
            print(f"server ready at {url}; warming up", flush=True)
            asyncio.run(clients_run(url, images, min(args.clients, 2 * (args.batch_size or 4)), 1))
            asyncio.run(clients_run(url, images, 1, 2))
            time.sleep(1)
            rss_before = rss(process.pid)
            rounds = []
            for index in range(args.rounds):
                one = asyncio.run(clients_run(url, images, 1, args.sequential))
                print(f"round {index + 1}: one at a time {one}", flush=True)
                many = asyncio.run(clients_run(url, images, args.clients, args.requests))
                time.sleep(1)
                many["rss_after"] = rss(process.pid)
                print(f"round {index + 1}: concurrent {many}", flush=True)
                rounds.append(
                    {
                        "one_at_a_time": one,
                        "concurrent": many,
                        "ratio": many["images_per_second"] / one["images_per_second"],
                    }
                )
            stats = httpx.get(f"{url}/v1/detectors/cap", timeout=10).json()["stats"]
        finally:
            process.terminate()
            code = process.wait(120)
        server_log = log.read_text()
    errors = [line for line in server_log.splitlines() if re.search(r"error|traceback|exception", line, re.I)]
    rss_after = rounds[-1]["concurrent"]["rss_after"]
    codes = {}
    for r in rounds:
        for k, v in r["concurrent"]["codes"].items():
            codes[k] = codes.get(k, 0) + v
    ratio = statistics.median(r["ratio"] for r in rounds)
    result = {
        "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "preset": args.preset,
        "settings": {
            "batch_size": args.batch_size,
            "max_wait_ms": args.max_wait_ms,
            "max_queue": args.max_queue,
            "clients": args.clients,
            "requests_per_client": args.requests,
            "sequential_requests": args.sequential,
        },
        "rounds": rounds,
        "throughput_ratio_median": ratio,
        "concurrent_status_codes": codes,
        "server_rss_before": rss_before,
        "server_rss_after": rss_after,
        "server_stats": stats,
        "server_log_error_lines": errors,
        "server_exit_code": code,
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    mib = 2**20
    m = result["machine"]
    lines = [
        f"# `clipfusion serve` under load ({args.preset} preset)",
        "",
        "> random-weight models: throughput and memory of the serving path only, not detection quality.",
        "",
        f"Command: `{result['command']}` ({result['date']}). One fitted 1-shot detector served by "
        f"`clipfusion serve` in a child process on 127.0.0.1 (`--batch-size {args.batch_size} --max-wait-ms "
        f"{args.max_wait_ms:g} --max-queue {args.max_queue}`), one 128 × 128 PNG per request, maps and "
        "overlays in every response. Rounds alternate the two phases.",
        "",
        "| round | one at a time, images/s | concurrent, images/s | concurrent / one at a time | "
        "concurrent p50 / p95 latency, s |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(rounds, 1):
        one, many = r["one_at_a_time"], r["concurrent"]
        lines.append(
            f"| {i} | {one['images_per_second']:.2f} | {many['images_per_second']:.2f} | "
            f"**{r['ratio']:.2f}×** | {many['latency_p50_s']:.2f} / {many['latency_p95_s']:.2f} |"
        )
    lines += [
        "",
        f"- median throughput ratio (concurrent / one at a time): **{ratio:.2f}×** "
        f"({args.clients} clients × {args.requests} requests against a loop of {args.sequential})",
        f"- status codes of the concurrent phases: {codes} (no 500)",
        f"- server batches: {stats['batches']} of {stats['mean_batch']} images on average, "
        f"largest {stats['largest_batch']}, {stats['failed_batches']} failed",
        f"- server RSS after warm-up {rss_before / mib:.0f} MiB, after the last concurrent phase "
        f"{rss_after / mib:.0f} MiB ({(rss_after - rss_before) / rss_before * 100:+.1f} %)",
        f"- error lines in the server log: {len(errors)}; server exit code after SIGTERM: {code}",
        f"- CPU: {m['cpu']}, {m['logical_cores']} logical cores, lscpu flags: {', '.join(m['lscpu_flags'])}",
        f"- torch {m['torch']}, torch.cpu.get_capabilities() true keys: "
        f"{', '.join(k for k in m['torch_cpu_capabilities'] if k.startswith(('avx', 'amx', 'fma')))}",
        f"- load average at the start {', '.join(f'{v:.2f}' for v in load_start)}, at the end "
        f"{', '.join(f'{v:.2f}' for v in result['load_average_end'])} (a shared machine: compare the "
        "ratio, not the absolute figures)",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
