"""Peak resident memory of one configuration, in a fresh process per configuration (so peaks do not mix).

``VmHWM`` over the whole life (build included), and during inference alone after resetting the high-water
mark (``echo 5 > /proc/self/clear_refs``); on CUDA ``torch.cuda.max_memory_allocated``. Each worker also
writes its maps for the faithfulness comparison, and its per-image time (one call, in a fresh process: the
only timing a dtype too slow to interleave gets).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import GB, OBJECT, build_detector, cycle, dtype_label, load_inputs
from benchmarks.faithfulness import collect_outputs

#: what a memory worker imports, loaded once by the fork server of smoke runs so that each worker starts in a
#: second instead of repeating ~20 s of imports (torch, open_clip with torchvision, diffusers, transformers)
WORKER_PRELOAD = (
    "torch",
    "numpy",
    "PIL.Image",
    "open_clip",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.schedulers.scheduling_ddpm",
    "transformers.models.clip.modeling_clip",
    "benchmarks.memory",
    "clipfusion.detector",
    "clipfusion.branches.patchclip",
    "clipfusion.branches.mapdiff",
    "clipfusion.models.clip",
    "clipfusion.models.diffusion",
)


def undo_memory_optimisations(det: Any) -> None:
    """The "before" of the memory table: diffusers' own VAE forward with its activations out of place again
    (the UNet was built with ``early_exit=false``, so nothing of it was dropped; glibc's default heap and
    the text encoders loaded with the image models, see :func:`memory_worker`)."""
    diffusion = getattr(det, "diffusion", None)
    if diffusion is not None:
        diffusion.lean_vae = False
        for module in diffusion.vae.encoder.modules():
            if isinstance(module, torch.nn.SiLU):
                module.inplace = False


def memory_worker(spec_path: str | Path) -> int:
    """One configuration in a fresh process: build, fit k references, predict the queries at batch 1.

    Records ``VmHWM`` after build + fit (the whole life so far), then resets it and records it again after
    inference (the inference peak alone); writes the outputs for the faithfulness comparison.
    """
    import importlib

    from clipfusion.runtime import process_memory, reset_peak_memory

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    for module in WORKER_PRELOAD:  # a spawned worker's imports, done before the first reading
        importlib.import_module(module)
    start_status = process_memory()
    if spec.get("plain"):  # glibc's own mmap threshold, not CLIPFusion's (runtime.map_large_blocks)
        import clipfusion.detector

        clipfusion.detector.map_large_blocks = lambda: False  # type: ignore[assignment]
    start = time.perf_counter()
    # as `clipfusion predict` and `evaluate` build: the prompts encoded and the text encoders freed before
    # the image models load; "before" loads everything, fits, then drops the text encoders
    det = build_detector(spec["preset"], spec["overrides"], objects=None if spec.get("plain") else [OBJECT])
    if spec.get("plain"):
        undo_memory_optimisations(det)
    build_s = time.perf_counter() - start
    references, queries = load_inputs(Path(spec["data"]))
    det.fit(OBJECT, references[: spec["shots"]]).release_text_encoders()
    loaded = process_memory()
    cuda = spec["device"].startswith("cuda")
    if cuda:
        load_vram = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    reset = reset_peak_memory()
    start = time.perf_counter()
    outputs = collect_outputs(det, cycle(queries, spec["n_images"]))
    infer_s = time.perf_counter() - start
    done = process_memory()
    np.savez(spec["outputs"], **outputs)
    batch = int(spec.get("batch") or 1)
    if cuda:
        inference_vram = torch.cuda.max_memory_allocated()
        if batch > 1:  # the throughput batch's VRAM (the GPU run's figure at batch 16)
            torch.cuda.reset_peak_memory_stats()
            det.predict(cycle(queries, batch), batch_size=batch)
    result = {
        "dtype": dtype_label(det),
        "resolved": det.resolved,
        "rss_after_imports_gb": start_status.get("rss", 0) / GB,
        "rss_after_load_gb": loaded.get("rss", 0) / GB,
        "peak_load_gb": loaded.get("peak_rss", 0) / GB,
        "peak_inference_gb": done.get("peak_rss", 0) / GB if reset else None,
        "peak_life_gb": max(loaded.get("peak_rss", 0), done.get("peak_rss", 0)) / GB,
        "hwm_reset": reset,
        "build_s": build_s,
        "inference_s_per_image": infer_s / max(1, spec["n_images"]),
        "images": spec["n_images"],
        "shots": spec["shots"],
    }
    if cuda:
        result["vram_load_gb"] = load_vram / GB
        result["vram_inference_gb"] = inference_vram / GB
        if batch > 1:
            result["vram_batch_gb"], result["batch"] = torch.cuda.max_memory_allocated() / GB, batch
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def worker_context(fresh: bool = True) -> Any:
    """The multiprocessing context the memory workers start from.

    ``fresh`` (real runs): ``spawn``, a new interpreter per worker that imports everything itself, as a
    user's ``clipfusion predict`` does, so its peak counts the pages the imports map (≈ 0.3 GB of them are
    the shared libraries of torch's and torchvision's CUDA builds). A child forked from a preloaded server
    inherits those mappings without their pages counting in its own resident set until it touches them: its
    peak reads ≈ 0.3 GB low, so only smoke runs (``--quick``, whose figures mean nothing) use the
    ``forkserver`` context, its imports preloaded and its server launched now. Either way each worker is
    its own process: its peaks are its own and it inherits no model memory or OpenMP state.
    """
    import multiprocessing

    if fresh:
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    forkserver.ensure_running()
    return context


class MemoryRun:
    """A memory worker process for one configuration; ``start`` launches it, ``wait`` returns its result.

    ``name`` labels the row (``float32``, ``auto``, ``float32, before``); ``plain`` undoes the memory
    optimisations (the UNet is built whole and the VAE's activations allocate) to show what they saved.
    """

    def __init__(
        self,
        name: str,
        *,
        preset: str,
        overrides: dict[str, Any],
        device: str,
        data: Path,
        workdir: Path,
        n_images: int,
        threads: int | None,
        target_gb: float | None = None,
        plain: bool = False,
        batch: int = 1,
    ) -> None:
        self.name = name
        self.target_gb = target_gb
        slug = name.replace(" ", "_").replace(",", "")
        self.spec_path = workdir / f"memory-{slug}.json"
        self.result_path = workdir / f"memory-{slug}.result.json"
        self.outputs = workdir / f"outputs-{slug}.npz"
        spec = {
            "preset": preset,
            "overrides": overrides,
            "device": device,
            "data": str(data),
            "shots": 1,
            "n_images": n_images,
            "outputs": str(self.outputs),
            "result": str(self.result_path),
            "threads": threads,
            "plain": plain,
            "batch": batch,
        }
        self.spec_path.write_text(json.dumps(spec))
        self.process: Any = None

    def start(self, context: Any) -> MemoryRun:
        self.process = context.Process(target=memory_worker, args=(str(self.spec_path),), daemon=True)
        self.process.start()
        return self

    def wait(self) -> dict[str, Any]:
        assert self.process is not None
        self.process.join()
        if self.process.exitcode != 0 or not self.result_path.exists():
            raise RuntimeError(
                f"memory worker ({self.name}) exited with code {self.process.exitcode} (traceback above)"
            )
        result = json.loads(self.result_path.read_text())
        result["name"] = self.name
        result["target_gb"] = self.target_gb
        if self.target_gb is not None and result.get("peak_inference_gb") is not None:
            result["pass_inference"] = result["peak_inference_gb"] < self.target_gb
        return result
