"""Speed and memory options change time and memory, never the maps (tiny preset)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipfusion import CLIPFusion
from clipfusion.branches.mapdiff import MapDiff
from clipfusion.errors import ClipfusionError


def _images(n, seed=0, size=96):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_released_text_encoders_free_memory_and_keep_prepared_objects_working():
    det = CLIPFusion.from_preset("tiny")
    refs, queries = _images(1, 1), _images(2, 2)
    before = det.fit("bottle", refs).predict(queries)
    n_params = sum(p.numel() for p in det.clip.model.parameters())
    det.prepare(["metal_nut"]).release_text_encoders()
    assert sum(p.numel() for p in det.clip.model.parameters()) < n_params
    assert det.diffusion.text_encoder is None
    after = det.fit("bottle", refs).predict(queries)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    det.fit("metal nut", refs)  # prepared before the release
    with pytest.raises(ClipfusionError, match="released"):
        det.fit("screw", refs)


def test_mapdiff_drops_the_unused_vae_decoder():
    md = MapDiff.from_preset("tiny")
    assert md.vae.decoder is None
    assert md.vae.encoder is not None


def test_channels_last_vae_gives_the_same_maps():
    images, refs = _images(2, 3), _images(1, 4)
    fast = MapDiff.from_preset("tiny", channels_last=True).fit("bottle", refs).predict(images)
    plain = MapDiff.from_preset("tiny", channels_last=False).fit("bottle", refs).predict(images)
    assert fast.keys() == plain.keys()
    for key in fast:
        torch.testing.assert_close(fast[key], plain[key], atol=1e-5, rtol=1e-4)


def test_compiled_vae_encoder_gives_the_same_latents():
    md = MapDiff.from_preset("tiny", compile=True)
    pixels = md.preprocess(_images(1, 5))
    compiled = md.encode_latents(pixels)
    plain = MapDiff.from_preset("tiny").encode_latents(pixels)
    torch.testing.assert_close(compiled, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_freed_heap_pages_go_back_to_the_system():
    import gc

    from clipfusion.runtime import _malloc_trim, return_freed_memory

    if _malloc_trim() is None:
        pytest.skip("not glibc: nothing to trim")

    def rss_mb() -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
        return int(line.split()[1]) / 1e3

    blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KB each: from the heap, not mmap
    pin = torch.ones(16)  # keeps the heap's top in use, so free() alone cannot shrink it
    high = rss_mb()
    del blocks
    gc.collect()
    return_freed_memory()
    assert rss_mb() < high - 150  # of the 256 MB freed
    del pin
