"""Cost of a 4 timesteps × 3 blocks grid (`evaluate --grid`) against one plain run, in one process.

Two detectors built once from the same seeded weights (the plain one as the preset configures it, the grid's
keeping every block a point reads, as ``evaluate --grid`` builds it) run, alternately, one plain ``evaluate``
(t = 100, block up_blocks.1: the preset's configuration) and one ``evaluate --grid
diffusion.timestep=50,100,200,400 diffusion.feature_blocks=up_blocks.0,up_blocks.1,up_blocks.2`` (12 points)
on the same synthetic category, shots and seeds. *Model time* is the time spent inside the models — VAE
encoder, UNet passes, CLIP branch — measured by the same wrappers in both; the map arithmetic, fusion, metrics
and file writing are reported separately (the grid does them 12 times). Separate runs would cost 12× the plain
run's model time; the issue's target is ≤ 2.3×.

Random weights (``tiny``, ``random-full``): compute only, never detection quality.

    .venv/bin/python benchmarks/bench_grid.py --presets tiny                       # a minute
    flock /tmp/clipfusion-heavy.lock .venv/bin/python benchmarks/bench_grid.py     # tiny and random-full
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from clipfusion.config import load_preset
from clipfusion.detector import CLIPFusion
from clipfusion.evaluation import evaluate
from clipfusion.evaluation.grid import build_config, evaluate_grid, grid_config_points

RESULTS = Path(__file__).resolve().parent / "results"
GRID = {
    "diffusion.timestep": [50, 100, 200, 400],
    "diffusion.feature_blocks": [("up_blocks.0",), ("up_blocks.1",), ("up_blocks.2",)],
}
TARGET = 2.3


class ModelClock:
    """Seconds spent in wrapped methods of the branch instances, by label, exclusive of nested wrapped calls
    (``MapDiff.predict`` runs the UNet passes from inside ``maps_from_passes``: that is model time,
    not map arithmetic)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._nested: list[float] = []  # per open wrapped call: time spent in wrapped calls inside it

    def wrap(self, obj: Any, method: str, label: str) -> None:
        original = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._nested.append(0.0)
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = self._nested.pop()
                self.seconds[label] += elapsed - inner
                if self._nested:
                    self._nested[-1] += elapsed

        setattr(obj, method, timed)

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": platform.processor() or "unknown",
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(Exception):
        info["torch_cpu_capabilities"] = dict(torch.cpu.get_capabilities())  # type: ignore[attr-defined]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["cpu"] = value.strip()
            if key.strip() == "Flags":
                info["cpu_flags"] = value.split()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    return info


def bench_preset(
    preset: str, n_test: int, scenarios: list[tuple[list[int], list[int]]], repeats: int, work: Path
) -> list[dict]:
    """Build the preset's detector once, then time each scenario (shot counts, seeds) plain against grid."""
    from clipfusion.data import make_synthetic_dataset

    root = make_synthetic_dataset(
        work / f"data-{preset}", categories=["bottle_cap"], n_train=4, n_test=n_test, image_size=256, seed=0
    )
    config = load_preset(preset).replace(device="cpu")
    start = time.perf_counter()
    detector = CLIPFusion(config)
    build_s = time.perf_counter() - start
    # the grid's detector keeps every block a point reads (the early exit drops the modules after the last
    # block of the configuration it is built for), as `evaluate --grid` builds it
    grid_detector = CLIPFusion(build_config(config, grid_config_points(config, GRID, work)))
    clock = ModelClock()
    for built in (detector, grid_detector):
        clock.wrap(built.diffusion, "encode_latents", "vae")
        clock.wrap(built.diffusion, "run_unet", "unet")
        clock.wrap(built.diffusion, "maps_from_passes", "maps")
        clock.wrap(built.clip, "fit", "clip")
        clock.wrap(built.clip, "predict", "clip")
    results = []
    for shots, seeds in scenarios:
        protocol = dict(
            categories=["bottle_cap"], shots=shots, seeds=seeds, progress=False, log=lambda _m: None
        )

        def plain(protocol: dict = protocol) -> None:
            evaluate(
                "folder",
                root,
                work / f"plain-{preset}",
                config=config,
                detector_factory=lambda _c: detector,
                **protocol,
            )

        def grid(protocol: dict = protocol) -> None:
            evaluate_grid(
                "folder",
                root,
                work / f"grid-{preset}",
                config=config,
                grid=GRID,
                detector_factory=lambda _c: grid_detector,
                **protocol,
            )

        samples: dict[str, list[dict[str, float]]] = {"plain": [], "grid": []}
        for _ in range(repeats):  # alternated, so that a drift of the machine's speed hits both alike
            for name, fn in (("plain", plain), ("grid", grid)):
                before = clock.snapshot()
                start = time.perf_counter()
                fn()
                wall = time.perf_counter() - start
                after = clock.snapshot()
                spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("vae", "unet", "clip", "maps")}
                spent["model"] = spent["vae"] + spent["unet"] + spent["clip"]
                spent["wall"] = wall
                samples[name].append(spent)
                print(
                    f"  {preset} {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in spent.items()), flush=True
                )
        median = {
            name: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
            for name, runs in samples.items()
        }
        ratios = [g["model"] / p["model"] for p, g in zip(samples["plain"], samples["grid"], strict=True)]
        results.append(
            {
                "preset": preset,
                "n_test": n_test,
                "shots": shots,
                "seeds": seeds,
                "runs_per_evaluation": len(
                    [k for k in dict.fromkeys(shots) for _ in (seeds if k else seeds[:1])]
                ),
                "build_s": build_s,
                "samples": samples,
                "median": median,
                "model_ratio_per_repeat": ratios,
                "model_ratio": statistics.median(ratios),
                "wall_ratio": median["grid"]["wall"] / median["plain"]["wall"],
                "vae_share_of_plain_model_time": median["plain"]["vae"] / median["plain"]["model"],
                "unet_share_of_plain_model_time": median["plain"]["unet"] / median["plain"]["model"],
            }
        )
    return results


def markdown(
    results: list[dict], info: dict, command: str, started: str, load: list[tuple[float, ...]]
) -> str:
    lines = [
        "# Cost of a grid over diffusion options (`evaluate --grid`)",
        "",
        "> **Random-init weights: compute only, not detection quality.**",
        "",
        f"Command: `{command}`  ",
        f"Run: {started} (UTC), git {info.get('git', '?')}  ",
        f"Load average at start / end: {', '.join(f'{x:.2f}' for x in load[0])} / "
        f"{', '.join(f'{x:.2f}' for x in load[-1])}",
        "",
        "Grid: `diffusion.timestep=50,100,200,400` × "
        "`diffusion.feature_blocks=up_blocks.0,up_blocks.1,up_blocks.2` (12 points) against one plain "
        "`evaluate` (t = 100, up_blocks.1), same weights (the grid's detector keeps every block a point "
        "reads), same data, "
        "alternated; model time = VAE encoder + UNet passes + CLIP branch (the same wrappers in both). "
        f"Separate runs: 12×; target ≤ {TARGET}×.",
        "",
        "| preset | test images, runs | plain: VAE / UNet / CLIP s (VAE share) | grid: VAE / UNet / CLIP s | "
        "model time ratio | wall-time ratio |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in results:
        p, g = r["median"]["plain"], r["median"]["grid"]
        verdict = "pass" if r["model_ratio"] <= TARGET else "FAIL"
        lines.append(
            f"| {r['preset']} | {r['n_test']}, {r['runs_per_evaluation']} (shots {r['shots']}, seeds "
            f"{r['seeds']}) | {p['vae']:.1f} / {p['unet']:.1f} / {p['clip']:.1f} "
            f"({100 * r['vae_share_of_plain_model_time']:.0f} %) "
            f"| {g['vae']:.1f} / {g['unet']:.1f} / {g['clip']:.1f} | **{r['model_ratio']:.2f}×** ({verdict}; "
            f"repeats {', '.join(f'{x:.2f}' for x in r['model_ratio_per_repeat'])}) "
            f"| {r['wall_ratio']:.2f}× |"
        )
    lines += [
        "",
        "Wall time includes what the grid does per point (map arithmetic, fusion, metrics and files, 12×).",
        "",
        "## Machine",
        "",
        f"- CPU: {info.get('cpu')}, {info.get('logical_cores')} logical cores, "
        f"torch threads {info.get('torch_threads')}",
        f"- torch {info.get('torch')}, CPU capability {info.get('torch_cpu_capability')}",
        f"- torch.cpu.get_capabilities(): {json.dumps(info.get('torch_cpu_capabilities'))}",
        f"- lscpu flags: {' '.join(info.get('cpu_flags', []))}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "random-full"])
    ap.add_argument("--n-test", type=int, default=4, help="test images for random-full (default 4)")
    ap.add_argument(
        "--tiny-n-test", type=int, default=16, help="test images for the tiny preset (default 16)"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--protocol-presets",
        nargs="*",
        default=["tiny"],
        help="presets also timed on a paper-style protocol of one category (shots 0 1 2 4, seeds 0-4: 16 "
        "runs, "
        "where the grid also shares each query's UNet pass between runs); default: tiny",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "grid_cpu.md", help="'-': print only")
    args = ap.parse_args(argv)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    info = machine()
    load = [os.getloadavg()]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            n = args.tiny_n_test if preset == "tiny" else args.n_test
            scenarios = [([1], [0])]
            if preset in args.protocol_presets:
                scenarios.append(([0, 1, 2, 4], [0, 1, 2, 3, 4]))
            print(f"{preset}: {n} test images, scenarios (shots, seeds) {scenarios}", flush=True)
            for r in bench_preset(preset, n, scenarios, args.repeats, Path(tmp)):
                results.append(r)
                print(
                    f"{preset}, {r['runs_per_evaluation']} run(s): grid model time / plain model time = "
                    f"{r['model_ratio']:.2f}× (target ≤ {TARGET}×), wall {r['wall_ratio']:.2f}×",
                    flush=True,
                )
            load.append(os.getloadavg())
    command = "benchmarks/bench_grid.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(results, info, command.strip(), started, load)
    print(text)
    if str(args.out) != "-":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        payload = {"command": command, "started": started, "machine": info, "load": load, "results": results}
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0 if all(r["model_ratio"] <= TARGET for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
