"""The prepared GPU run of the speed benchmark: the CPU harness (:mod:`clipfusion.bench`) on CUDA.

Random-init weights (``random-full``): compute and memory only, not detection quality. On CUDA it times
float16 and bfloat16 (``--dtypes`` to change): ms per image at batch 1 (zero-shot, 1-shot) beside anomalib's
WinCLIP in the same dtype, images per second at batch 16, time and FLOPs per stage against the measured
fp32/fp16/bf16 matmul peaks, peak VRAM (``torch.cuda.max_memory_allocated``: load, batch 1, batch 16) and the
Pearson correlation of each dtype's maps and scores with float32 ones on the same GPU. All timing is
CUDA-synchronised; a few minutes on an H200 (three model builds dominate).

    python benchmarks/bench_gpu.py --results-dir "$OUT"      # on the lent machine: speed_cuda.{json,md}
    cp <fetched>/speed_cuda.json benchmarks/results/ && \\
        python benchmarks/bench_speed.py --render-only        # here: RESULTS.md gains its GPU section

Without a usable CUDA device it stops at once with a message and exit status 2.
"""

from __future__ import annotations

import sys

from clipfusion.bench import main

if __name__ == "__main__":
    sys.exit(main(["--device", "cuda", *sys.argv[1:]], prog="benchmarks/bench_gpu.py"))
