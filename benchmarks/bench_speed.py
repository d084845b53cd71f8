"""CLIPFusion against anomalib's WinCLIP on this machine: latency, throughput, stages, FLOPs, memory.

Random-init weights (``random-full``): compute and memory only, not detection quality. The logic lives in
:mod:`clipfusion.bench` (also ``clipfusion bench``); this is the one command:

    .venv/bin/python benchmarks/bench_speed.py            # full CPU run (~25 min on 2 cores), writes
                                                          # benchmarks/RESULTS.md + results/speed_cpu.json
    .venv/bin/python benchmarks/bench_speed.py --quick    # smoke run, tiny preset, < 1 min
    .venv/bin/python benchmarks/bench_speed.py --shots 1 --set diffusion.compile=true   # any option
    .venv/bin/python benchmarks/bench_speed.py --render-only   # re-render RESULTS.md from the JSONs
"""

from __future__ import annotations

import sys

from clipfusion.bench import main

if __name__ == "__main__":
    sys.exit(main(prog="benchmarks/bench_speed.py"))
