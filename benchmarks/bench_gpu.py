"""The prepared GPU run of the comparison (:mod:`benchmarks`) on CUDA, for a lent GPU machine.

Random-init weights (``random-full``): compute and memory only, not detection quality. On CUDA it times
CLIPFusion at float16, bfloat16 and auto (``--dtypes`` to change) beside anomalib's WinCLIP at float32 (as
shipped) and float16: ms per image at batch 1 (zero-shot, 1-shot), images per second at batch 16, time and
FLOPs per stage against the fp32/fp16/bf16 matmul and convolution peaks measured in the same run, and per
dtype in a fresh process the peak VRAM (``torch.cuda.max_memory_allocated``: load, batch 1, batch 16) and
the Pearson correlation of its maps with float32's. All timing is CUDA-synchronised; a few minutes on an H200.

    python benchmarks/bench_gpu.py --results-dir "$OUT"      # on the lent machine: speed_cuda.{json,md}
    cp <fetched>/speed_cuda.json benchmarks/results/ && \\
        python benchmarks/bench_speed.py --render-only        # here: RESULTS.md gains its GPU section

Without a usable CUDA device it stops at once with a message and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.run import main

if __name__ == "__main__":
    sys.exit(main(["--device", "cuda", *sys.argv[1:]], prog="benchmarks/bench_gpu.py"))
