"""CLIPFusion at float32, bfloat16 and auto against anomalib's WinCLIP at float32 (as shipped) and
bfloat16, on this machine, in one process: latency, throughput, stages, FLOPs and the compute floor,
profile, memory.

Random-init weights (``random-full``): compute and memory only, not detection quality. The harness is the
:mod:`benchmarks` package; this is its command (run from the repository root, anomalib installed):

    python benchmarks/bench_speed.py              # full CPU run (about an hour on 2 cores), writes
                                                  # benchmarks/RESULTS.md + benchmarks/results/speed_cpu.json
    python benchmarks/bench_speed.py --quick      # smoke run on the tiny preset, a minute or two
    python benchmarks/bench_speed.py --shots 1 --set diffusion.compile=true   # any option
    python benchmarks/bench_speed.py --render-only   # re-render RESULTS.md from the JSONs

To measure your own configuration on your machine without anomalib, use ``clipfusion bench``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.run import main

if __name__ == "__main__":
    sys.exit(main(prog="benchmarks/bench_speed.py"))
