"""The speed and memory harness of clipfusion: CLIPFusion against anomalib's WinCLIP on one machine.

**Random-init weights: compute and memory only, not detection quality.** The ``random-full`` preset builds
the real architectures (OpenCLIP ViT-B-16-plus-240, SD-2 inpainting) with seeded random weights.

Entry points: ``benchmarks/bench_speed.py`` (the CPU comparison, writes ``benchmarks/RESULTS.md`` and
``benchmarks/results/speed_cpu.json``), ``benchmarks/bench_gpu.py`` (the same on CUDA) and
``benchmarks/bench_metrics.py`` (the pixel metrics). The modules, each one concern:

- :mod:`benchmarks.common`: the inputs, the detectors and their twins on shared modules
- :mod:`benchmarks.timing`: interleaved timing, the other processes' load
- :mod:`benchmarks.machine`: CPU model and features (AMX or not), versions, measured compute peaks
- :mod:`benchmarks.flops`: FLOP counting per kernel kind (matmul, convolution), the compute floor
- :mod:`benchmarks.stages`: time and FLOPs per stage of one prediction
- :mod:`benchmarks.winclip`: anomalib's WinCLIP around our CLIP model
- :mod:`benchmarks.comparison`: the dtypes and both detectors, interleaved in one process
- :mod:`benchmarks.ablation`: each optimisation switched off in turn (variants built as branch objects)
- :mod:`benchmarks.profiling`: where the time goes inside the VAE encoder and the UNet (torch profiler)
- :mod:`benchmarks.memory`: peak resident memory, one fresh process per configuration
- :mod:`benchmarks.faithfulness`: reduced-precision maps against float32 maps
- :mod:`benchmarks.settings`, :mod:`benchmarks.run`: the options and the run; :mod:`benchmarks.report`
  and :mod:`benchmarks.report_sections`: RESULTS.md
"""

LABEL = "random-init weights: compute and memory only, not detection quality"
