"""Time and peak memory to a detector ready to predict: fitting it (what `predict --object` does: each text
encoder loaded, used for the prompts and freed before the image models load) against loading a saved fit
(what `predict --fitted` does: build the branches without text encoders, read the saved embeddings).

Each contender runs in a fresh child process (peak RSS is per process), alternating, ``--rounds`` times.
Zero-shot, so the fit does no image work either: the difference is the text encoders alone.

    flock /tmp/clipfusion-heavy.lock python benchmarks/bench_load.py                 # random-full, 2 rounds
    python benchmarks/bench_load.py --preset tiny --rounds 1 --out /tmp/load.md      # a smoke run

Random-weight models: load time and memory only, never detection quality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OBJECT = "metal nut"


def child(mode: str, preset: str, folder: str) -> None:
    # the libraries the loaders import lazily, imported before the clock starts: both contenders need them
    import diffusers  # noqa: F401
    import open_clip  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    from clipfusion import CLIPFusion
    from clipfusion.config import load_preset
    from clipfusion.runtime import process_memory, reset_peak_memory

    reset_peak_memory()  # the peak below is the models', not the imports'
    start = time.perf_counter()
    if mode == "load":
        detector = CLIPFusion.load(folder)
    else:
        # as `predict --object` builds: the prompts encoded, the text encoders freed before the image models
        detector = CLIPFusion(load_preset(preset), objects=[OBJECT]).fit(OBJECT)
    seconds = time.perf_counter() - start
    memory = process_memory()  # while the detector is alive: what a predicting process holds
    if mode == "save":
        detector.save(folder)
    print(json.dumps({"mode": mode, "seconds": seconds, **memory}))


def run_child(mode: str, preset: str, folder: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--preset", preset, "--folder", str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> list[str]:
    import os
    import platform

    import torch

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    get = getattr(torch.cpu, "get_capabilities", None)
    found = get() if get is not None else {}
    capabilities = ", ".join(
        k for k, v in sorted(found.items()) if v is True and k.startswith(("avx", "amx"))
    )
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma")
    return [
        f"CPU: {model}, {os.cpu_count()} logical cores, flags: {', '.join(f for f in wanted if f in flags)}",
        f"torch {torch.__version__}, torch.cpu.get_capabilities() true avx/amx keys: {capabilities}",
        f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="random-full")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load_fitted.md")
    parser.add_argument("--child", choices=("save", "fit", "load"))
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.preset, args.folder)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "fitted"
        run_child("save", args.preset, folder)
        runs: dict[str, list[dict]] = {"fit": [], "load": []}
        for _ in range(args.rounds):
            for mode in runs:
                runs[mode].append(run_child(mode, args.preset, folder))
                print(runs[mode][-1], flush=True)
    gib = 1024**3
    fit_s = statistics.median(r["seconds"] for r in runs["fit"])
    load_s = statistics.median(r["seconds"] for r in runs["load"])
    fit_peak = statistics.median(r["peak_rss"] for r in runs["fit"]) / gib
    load_peak = statistics.median(r["peak_rss"] for r in runs["load"]) / gib
    fit_rss = statistics.median(r["rss"] for r in runs["fit"]) / gib
    load_rss = statistics.median(r["rss"] for r in runs["load"]) / gib
    lines = [
        f"# Ready to predict: fit vs load of a saved fit ({args.preset}, zero-shot)",
        "",
        "> random-init weights: load time and memory only, not detection quality.",
        "",
        f"Command: `python benchmarks/bench_load.py --preset {args.preset} --rounds {args.rounds}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); medians of {args.rounds} child processes "
        "each, alternating; clock and peak RSS start after the imports.",
        "",
        "| | fit (`predict --object`) | load (`predict --fitted`) | load / fit |",
        "|---|---|---|---|",
        f"| seconds to ready | {fit_s:.2f} | {load_s:.2f} | {load_s / fit_s:.2f}× |",
        f"| peak RSS, GiB | {fit_peak:.2f} | {load_peak:.2f} | {load_peak / fit_peak:.2f}× |",
        f"| RSS when ready, GiB | {fit_rss:.2f} | {load_rss:.2f} | {load_rss / fit_rss:.2f}× |",
        "",
        "Each run (seconds, peak RSS GiB): "
        + "; ".join(
            f"{mode} {r['seconds']:.2f} s / {r['peak_rss'] / gib:.2f}" for mode in runs for r in runs[mode]
        ),
        "",
        *(f"- {line}" for line in machine()),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
