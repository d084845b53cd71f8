"""The benchmark's options: one dataclass, its command line, and the defaults per device and ``--quick``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

#: the channel counts and sides of the VAE's and UNet's 3×3 convolutions (at 512 px), scaled down in side so
#: that each probe is about 20 GFLOP: the convolution peak is the best of them
CONV_SHAPES = ((128, 256), (256, 128), (512, 64), (640, 32), (1280, 16))


@dataclasses.dataclass
class Settings:
    """Everything a run needs, resolved from the command line (``--quick`` and ``--device`` set defaults)."""

    device: str = "cpu"
    preset: str = "random-full"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: CLIPFusion contenders; "auto" shares the weights of the explicit dtype it resolves to
    dtypes: list[str] = dataclasses.field(default_factory=lambda: ["float32", "bfloat16", "auto"])
    winclip_dtypes: list[str] = dataclasses.field(default_factory=lambda: ["float32", "bfloat16"])
    shots: list[int] = dataclasses.field(default_factory=lambda: [0, 1])
    repeats: int = 5
    warmup: int = 1
    batch: int = 8
    throughput_repeats: int = 2
    # CPU: no warm-up at the large batch (~100 s a call; the batch-1 runs have warmed the same code). CUDA:
    # warm-up matters (kernel selection).
    throughput_warmup: int = 0
    stage_repeats: int = 3
    faith_images: int = 2
    image_size: int = 512
    #: a contender whose call is projected (its FLOPs at the slowest measured kernels of its dtype) to take
    #: longer than this is not interleaved (minutes per call: a dtype without hardware support); its memory
    #: run still times one call
    max_call_s: float = 120.0
    winclip: bool = True
    throughput: bool = True
    memory: bool = True
    faithfulness: bool = True
    ablation: bool = True
    ablation_repeats: int = 3
    ablation_compile: bool = True
    profile: bool = True
    #: memory workers in a fresh interpreter each (spawn), not forked from a preloaded server (memory.py)
    fresh_workers: bool = True
    matmul_n: int = 2048
    conv_shapes: tuple[tuple[int, int], ...] = CONV_SHAPES
    conv_batch: int = 1
    peak_repeats: int = 5
    threads: int | None = None
    quick: bool = False
    command: str = ""

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--quick", action="store_true", help="smoke run: tiny preset, 1 repeat, small sizes (a minute or two)"
    )
    add("--device", default="cpu", help="cpu (default) or cuda[:i]")
    add("--preset", default=None, help="detector preset (default random-full; tiny with --quick)")
    add(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every build, e.g. --set diffusion.compile=true (repeatable)",
    )
    add("--dtypes", default=None, help="CLIPFusion dtypes (default float32,bfloat16,auto; CUDA float16,…)")
    add(
        "--winclip-dtypes",
        default=None,
        help="WinCLIP dtypes (default float32,bfloat16; CUDA float32,float16)",
    )
    add("--shots", default=None, help="comma list of k (default 0,1)")
    add("--repeats", type=int, default=None, help="timed rounds per regime (default 5 CPU, 10 CUDA)")
    add("--warmup", type=int, default=None, help="untimed warm-up rounds (default 1 CPU, 3 CUDA)")
    add("--batch", type=int, default=None, help="throughput batch size (default 8 CPU, 16 CUDA)")
    add("--throughput-repeats", type=int, default=None, help="timed throughput batches (default 2, CUDA 5)")
    add("--throughput-warmup", type=int, default=None, help="untimed batches first (default 0, CUDA 2)")
    add("--stage-repeats", type=int, default=None, help="repeats of the stage breakdown (default 3)")
    add("--faith-images", type=int, default=None, help="images for the faithfulness check (default 2)")
    add(
        "--max-call-s", type=float, default=None, help="projected s/call above which a contender is not timed"
    )
    add("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add("--no-winclip", action="store_true", help="skip the anomalib WinCLIP baseline")
    add("--no-throughput", action="store_true", help="skip the throughput measurement")
    add("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    add("--no-ablation", action="store_true", help="skip timing each optimisation switched off in turn")
    add("--ablation-repeats", type=int, default=None, help="timed rounds of the ablation (default 3)")
    add("--no-compile", action="store_true", help="leave the compiled-VAE variant out of the ablation")
    add("--no-profile", action="store_true", help="skip the operator profile of the VAE and UNet")
    add("--no-faithfulness", action="store_true", help="skip the reduced-precision comparison")
    add("--results-dir", type=Path, default=None, help="JSON folder (default benchmarks/results)")
    add(
        "--out",
        type=Path,
        default=None,
        help="Markdown report (default benchmarks/RESULTS.md on CPU, <results-dir>/speed_cuda.md on CUDA); "
        "- = stdout",
    )
    add("--json", type=Path, default=None, help="raw results (default <results-dir>/speed_<device>.json)")
    add("--render-only", action="store_true", help="measure nothing: re-render the Markdown from the JSON")


def _names(text: str | None) -> list[str] | None:
    return [d.strip() for d in text.split(",") if d.strip()] if text else None


def settings_from_args(args: argparse.Namespace, command: str = "") -> Settings:
    """Resolve the defaults: ``--quick`` picks the tiny preset and minimal counts, CUDA larger counts."""
    from clipfusion.config import parse_overrides
    from clipfusion.errors import ConfigError

    s = Settings(device=args.device, command=command)
    if s.cuda:
        s.dtypes, s.winclip_dtypes = ["float16", "bfloat16", "auto"], ["float32", "float16"]
        s.repeats, s.warmup, s.batch, s.throughput_repeats, s.throughput_warmup = 10, 3, 16, 5, 2
        s.matmul_n, s.conv_batch = 8192, 8
    if args.quick:
        s.preset, s.repeats, s.warmup, s.batch, s.throughput_repeats = "tiny", 1, 1, 2, 1
        s.stage_repeats, s.faith_images, s.image_size = 1, 2, 256
        s.ablation_repeats, s.ablation_compile = 1, False
        s.matmul_n, s.conv_shapes, s.peak_repeats = 256, ((64, 32), (128, 16)), 2
        s.quick, s.fresh_workers = True, False
        # one thread: the worker server's imports then take the other core, instead of stalling the
        # OpenMP barriers of a two-thread pool (smoke-run timings mean nothing anyway)
        s.threads = 1
    s.preset = args.preset or s.preset
    try:
        s.overrides.update(parse_overrides(args.overrides))
    except ConfigError as exc:
        raise SystemExit(str(exc)) from exc
    s.dtypes = _names(args.dtypes) or s.dtypes
    s.winclip_dtypes = _names(args.winclip_dtypes) or s.winclip_dtypes
    if args.shots:
        s.shots = sorted({int(v) for v in args.shots.split(",") if v.strip()})
    for name in (
        "repeats",
        "warmup",
        "batch",
        "throughput_repeats",
        "throughput_warmup",
        "stage_repeats",
        "faith_images",
        "threads",
        "ablation_repeats",
        "max_call_s",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    if (
        min(s.repeats, s.batch, s.throughput_repeats, s.stage_repeats, s.faith_images, s.ablation_repeats) < 1
        or min(s.warmup, s.throughput_warmup) < 0
    ):
        raise SystemExit(
            "repeats, batch, throughput/stage repeats and faith images must be >= 1, warmup >= 0"
        )
    if any(k < 0 for k in s.shots) or not s.shots:
        raise SystemExit("--shots must list k >= 0")
    s.winclip, s.throughput = not args.no_winclip, not args.no_throughput
    s.memory, s.faithfulness, s.profile = not args.no_memory, not args.no_faithfulness, not args.no_profile
    s.ablation, s.ablation_compile = not args.no_ablation, s.ablation_compile and not args.no_compile
    return s
