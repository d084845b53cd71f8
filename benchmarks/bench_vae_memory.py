"""Where the fp32 inference peak above the loaded models comes from: the SD-2 VAE encoder at 512².

The speed issue's memory target (< 5 GB peak at the resolved dtype, random-full, k = 1) is decided here on a
CPU without AMX: about 4.7 GB are resident once the float32 models are loaded, and the VAE encoder is the only
stage that works at 512 × 512 with 128 channels (134 MB per activation). This script isolates it and
reports, in a fresh process per variant, its peak above the resident set for one image, and each top-level
block's own transient peak: diffusers' forward against MapDiff's lean pass
(``clipfusion.branches.mapdiff.lean_vae``: each activation released as soon as nothing reads it, the same
latents bit for bit; banded, the first block
holds one activation at a time and its latents are diffusers' to float32 rounding), with and without banding,
channels-last and in-place SiLU.

    python benchmarks/bench_vae_memory.py                    # prints a markdown table (about a minute)
    python benchmarks/bench_vae_memory.py --out benchmarks/results/vae_memory.md

Random-init weights (the shipped SD-2 VAE configuration): memory and time only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9
VARIANTS = {
    "lean pass, banded, channels-last, SiLU in place (what MapDiff runs)": (
        "lean",
        "channels_last",
        "inplace",
    ),
    "lean pass, not banded, channels-last, SiLU in place": ("lean", "unbanded", "channels_last", "inplace"),
    "diffusers' pass, channels-last, SiLU in place": ("channels_last", "inplace"),
    "channels-last": ("channels_last",),
    "contiguous, SiLU in place": ("inplace",),
    "contiguous": (),
}


def child(options: list[str]) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from clipfusion.runtime import map_large_blocks, process_memory, reset_peak_memory

    map_large_blocks()  # as CLIPFusion sets it before loading

    config_dir = Path(__file__).resolve().parents[1] / "src/clipfusion/models/configs/sd2-inpainting/vae"
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(json.loads((config_dir / "config.json").read_text())).eval()
    vae.decoder = None
    encoder = vae.encoder
    if "channels_last" in options:
        encoder.to(memory_format=torch.channels_last)
    if "inplace" in options:
        for module in encoder.modules():
            if isinstance(module, torch.nn.SiLU):
                module.inplace = True
    pixels = torch.randn(1, 3, 512, 512)
    if "channels_last" in options:
        pixels = pixels.to(memory_format=torch.channels_last)
    blocks: dict[str, float] = {}
    # each top-level block from its first module to the next block's first (the banded pass computes with
    # the blocks' weights, not through their modules, so only the blocks' first modules are sure to run)
    top = [("conv_in", encoder.conv_in)]
    top += [(f"down_blocks.{i}", b.resnets[0].norm1) for i, b in enumerate(encoder.down_blocks)]
    top.append(("mid_block", encoder.mid_block.resnets[0].norm1))
    top += [(name, getattr(encoder, name)) for name in ("conv_norm_out", "conv_out")]
    measuring = False
    current: list[tuple[str, int]] = []

    def close() -> None:
        if current:
            name, start_rss = current.pop()
            blocks[name] = (process_memory()["peak_rss"] - start_rss) / GB

    def opener(name: str):
        def hook(*_args: object) -> None:
            if measuring:
                close()
                reset_peak_memory()
                current.append((name, process_memory()["rss"]))

        return hook

    for name, first in top:
        first.register_forward_pre_hook(opener(name))
    encoder.conv_out.register_forward_hook(lambda *_args: close() if measuring else None)
    if "lean" in options:
        from clipfusion.branches.mapdiff.lean_vae import encode_moments

        band_min_bytes = 1 << 62 if "unbanded" in options else None

        def run(x: torch.Tensor) -> torch.Tensor:
            if band_min_bytes is None:
                return encode_moments(vae, x)
            return encode_moments(vae, x, band_min_bytes=band_min_bytes)
    else:

        def run(x: torch.Tensor) -> torch.Tensor:
            return vae.encode(x).latent_dist.parameters

    with torch.inference_mode():
        run(pixels)  # warm-up: oneDNN primitives and allocator pools
        # the whole pass first, with no block hook resetting the mark: its peak counts every activation
        reset_peak_memory()
        resident = process_memory()["rss"]
        begin = time.perf_counter()
        run(pixels)
        seconds = time.perf_counter() - begin
        whole = (process_memory()["peak_rss"] - resident) / GB
        measuring = True  # then each block's own peak above what is resident when it starts
        run(pixels)
        measuring = False
    return {"resident_gb": resident / GB, "peak_above_gb": whole, "seconds": seconds, "blocks": blocks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the markdown there (default: print only)")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.machine import flags_line, machine_info

    machine = machine_info("cpu")
    results = {}
    for label, options in VARIANTS.items():
        run = subprocess.run(
            [sys.executable, __file__, "--child", *options], capture_output=True, text=True, check=True
        )
        results[label] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{label}: {results[label]['peak_above_gb']:.2f} GB above resident", file=sys.stderr)
    names = list(next(iter(results.values()))["blocks"])
    lines = [
        "# VAE encoder at 512², float32: its peak above the resident set",
        "",
        "> random-init weights (the shipped SD-2 VAE configuration): memory and time only.",
        "",
        "Command: `python benchmarks/bench_vae_memory.py`; one image, batch 1, after a warm-up pass, "
        f"one fresh process per variant. Machine: **{flags_line(machine)}**, "
        f"torch {machine['versions']['torch']}, git {machine.get('git')}.",
        "",
        "| variant | peak above resident, GB | seconds | " + " | ".join(names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for label, r in results.items():
        cells = " | ".join(f"{r['blocks'].get(n, 0.0):.2f}" for n in names)
        lines.append(f"| {label} | {r['peak_above_gb']:.2f} | {r['seconds']:.2f} | {cells} |")
    lines += [
        "",
        "Peak above resident: the whole pass (its input and every activation) above the loaded model. Block "
        "columns: each top-level encoder module's own transient peak above the resident set when it starts "
        "(its input already counted there), from another pass. GB; one 512² activation with 128 channels is "
        "0.134 GB.",
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
