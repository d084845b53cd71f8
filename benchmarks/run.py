"""The run: every section in order, each failure recorded without losing the others' figures; the command
line shared by ``bench_speed.py`` and ``bench_gpu.py``; writing the JSON and RESULTS.md."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import LABEL
from benchmarks.common import detector_overrides, load_inputs, make_inputs
from benchmarks.faithfulness import faithfulness
from benchmarks.machine import machine_info, measure_peaks, speed_probe
from benchmarks.memory import MemoryRun, worker_context
from benchmarks.settings import Settings, add_arguments, settings_from_args
from benchmarks.timing import CpuMonitor
from clipfusion.runtime import return_freed_memory

BENCHMARKS = Path(__file__).resolve().parent
#: issue 12: peak resident memory at the resolved dtype (random-full, k = 1), GB
MEMORY_TARGET_GB = 5.0


def run(settings: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every section; a section that fails is recorded under ``errors`` and the others still run."""
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, log)
    finally:
        torch.set_num_threads(threads)  # a caller's process (a test session) keeps its own setting


def _run(settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    settings_record = {k: v for k, v in dataclasses.asdict(settings).items() if k != "command"}
    results: dict[str, Any] = {
        "label": LABEL,
        "command": settings.command,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": settings_record,
        "errors": [],
    }
    monitor = CpuMonitor(interval=10.0).__enter__()
    results["machine"] = machine_info(settings.device)
    log(f"machine: {results['machine']['cpu']}; auto: {results['machine']['auto_dtype']}")

    def section(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # one failed section must not lose the others' numbers
            traceback.print_exc()
            results["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            return None

    peak_dtypes = ["float32", "float16", "bfloat16"] if settings.cuda else ["float32", "bfloat16"]
    peaks = section(
        "peaks",
        lambda: measure_peaks(
            settings.device,
            peak_dtypes,
            matmul_n=settings.matmul_n,
            conv_shapes=settings.conv_shapes,
            conv_batch=settings.conv_batch,
            repeats=settings.peak_repeats,
        ),
    ) or {"matmul": {}, "conv": {}, "conv_shapes": {}}
    results["peaks"] = peaks
    log(
        "peaks (GFLOP/s): "
        + ", ".join(f"{k} {d} {v:.1f}" for k in ("matmul", "conv") for d, v in peaks[k].items())
    )
    results["probe_start"] = section("speed probe", lambda: speed_probe(settings.device))

    with tempfile.TemporaryDirectory(prefix="clipfusion-bench-") as tmp:
        workdir = Path(tmp)
        n_queries = max(settings.batch, settings.faith_images, settings.repeats, 2)
        data = make_inputs(
            workdir / "data",
            n_references=max(max(settings.shots), 1),
            n_queries=n_queries,
            size=settings.image_size,
        )
        references, queries = load_inputs(data)
        # a fork server starts early, so its imports overlap the timed sections (smoke runs)
        server = worker_context(fresh=False) if settings.memory and not settings.fresh_workers else None

        from benchmarks.comparison import comparison_section

        results["comparison"] = section(
            "comparison", lambda: comparison_section(settings, references, queries, peaks, log)
        )
        return_freed_memory()  # the comparison's detectors are gone; the ablation builds its own
        if settings.ablation:
            from benchmarks.ablation import ablation_section

            results["ablation"] = section(
                "ablation",
                lambda: ablation_section(
                    settings.preset,
                    settings.device,
                    settings.overrides,
                    "auto",
                    references,
                    queries,
                    repeats=settings.ablation_repeats,
                    compile_variant=settings.ablation_compile,
                    log=log,
                ),
            )
        # the load figure covers the timed sections; the memory workers below are forked from the worker
        # server, not from this process, so their CPU time would read as another process's
        results["probe_end"] = section("speed probe", lambda: speed_probe(settings.device))
        monitor.__exit__(None, None, None)
        results["load"] = monitor.result
        if settings.memory:
            memory_section(settings, results, data, workdir, server, section, log)
    results["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return results


def memory_runs(settings: Settings, results: dict[str, Any], data: Path, workdir: Path) -> list[MemoryRun]:
    """One worker per CLIPFusion dtype, and the resolved dtype without its memory optimisations (before)."""
    floors = {
        c["dtype"]: c["projected_s"]
        for c in (results.get("comparison") or {}).get("contenders", [])
        if c["system"] == "clipfusion"
    }

    def job(name: str, dtype: str, *, plain: bool = False) -> MemoryRun:
        floor = floors.get(dtype)
        slow = floor is not None and floor > settings.max_call_s  # one image: each costs minutes
        overrides = {**settings.overrides, **({"diffusion.early_exit": False} if plain else {})}
        return MemoryRun(
            name,
            preset=settings.preset,
            overrides=detector_overrides(settings.device, overrides, dtype),
            device=settings.device,
            data=data,
            workdir=workdir,
            n_images=1 if slow else settings.faith_images,
            threads=settings.threads,
            target_gb=MEMORY_TARGET_GB if dtype == "auto" and not plain else None,
            plain=plain,
            batch=settings.batch if settings.cuda else 1,
        )

    runs = [job(dtype, dtype) for dtype in settings.dtypes]
    if "auto" in settings.dtypes:
        runs.append(job("auto, before", "auto", plain=True))
    return runs


def memory_section(
    settings: Settings,
    results: dict[str, Any],
    data: Path,
    workdir: Path,
    server: Any,
    section: Callable[[str, Callable[[], Any]], Any],
    log: Callable[[str], None],
) -> None:
    """Peak memory per dtype, one fresh process each, one at a time (a peak must not depend on another's);
    then every dtype's maps against float32's."""
    results["memory"] = []
    outputs = {}
    server = server or worker_context(settings.fresh_workers)
    for job in memory_runs(settings, results, data, workdir):
        log(f"memory worker {job.name} …")
        result = section(f"memory {job.name}", lambda job=job: job.start(server).wait())
        if result is not None:
            results["memory"].append(result)
            outputs[job.name] = dict(np.load(job.outputs))
            log(f"memory {job.name}: peak {result['peak_inference_gb'] or float('nan'):.2f} GB inference")
    if settings.faithfulness and "float32" in outputs:
        results["faithfulness"] = {
            name: faithfulness(outputs["float32"], out) for name, out in outputs.items() if name != "float32"
        }


# ---------------------------------------------------------------------------------------------------------
# command line


def _paths(args: argparse.Namespace) -> tuple[Path, Path | None, Path]:
    """(JSON path, Markdown path or None for stdout, results dir)."""
    cuda = args.device.startswith("cuda")
    results_dir = args.results_dir or BENCHMARKS / "results"
    json_path = args.json or results_dir / f"speed_{'cuda' if cuda else 'cpu'}.json"
    if args.out is not None and str(args.out) == "-":
        return json_path, None, results_dir
    out = args.out or (results_dir / "speed_cuda.md" if cuda else BENCHMARKS / "RESULTS.md")
    return json_path, out, results_dir


def write_report(results: dict[str, Any], json_path: Path, out: Path | None, results_dir: Path) -> str:
    """Write the JSON and the Markdown; a CPU report takes in the GPU results found next to its JSON."""
    from benchmarks.report import render_markdown
    from clipfusion.files import atomic_write_text  # an interrupted write never truncates old results

    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(results, indent=1, default=str) + "\n")
    gpu = None
    cuda = str(results.get("settings", {}).get("device", "cpu")).startswith("cuda")
    gpu_json = results_dir / "speed_cuda.json"
    if not cuda and gpu_json.exists():
        gpu = json.loads(gpu_json.read_text())
    markdown = render_markdown(results, gpu)
    if out is None:
        sys.stdout.write(markdown)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, markdown)
    return markdown


def run_from_args(args: argparse.Namespace, command: str = "") -> int:
    json_path, out, results_dir = _paths(args)
    if args.render_only:
        if not json_path.exists():
            print(f"--render-only: {json_path} does not exist", file=sys.stderr)
            return 2
        write_report(json.loads(json_path.read_text()), json_path, out, results_dir)
        print(f"wrote {out or 'stdout'} from {json_path}", file=sys.stderr)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"--device {args.device}: this machine has no usable CUDA device (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'}). Run the GPU benchmark on a machine with a "
            "GPU; the CPU benchmark is `python benchmarks/bench_speed.py`.",
            file=sys.stderr,
        )
        return 2
    settings = settings_from_args(args, command)
    if settings.winclip and importlib.util.find_spec("anomalib") is None:
        # checked before an hour of work, not discovered as a failed section at the end
        print(
            "the WinCLIP baseline needs anomalib, which is not installed: pip install 'clipfusion[bench]' "
            "(or run with --no-winclip to time CLIPFusion alone)",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    def log(message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    results = run(settings, log)
    write_report(results, json_path, out, results_dir)
    log(f"wrote {json_path} and {out or 'stdout'}")
    if results["errors"]:
        log("some sections failed: " + "; ".join(results["errors"]))
        return 1
    return 0


def main(argv: list[str] | None = None, *, prog: str = "benchmarks/bench_speed.py") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=f"CLIPFusion vs anomalib WinCLIP: speed, stages, FLOPs, memory ({LABEL})."
    )
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_from_args(parser.parse_args(argv), shlex.join([prog, *argv]))
