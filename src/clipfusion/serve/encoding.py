"""What the server sends for one image: the anomaly map as base64 float32, and an overlay PNG.

**The map is base64 of the raw float32 values** (little-endian, row-major, with its ``shape``), not a 16-bit
PNG. Reasons: it is exact (the very floats :meth:`CLIPFusion.predict` returns, so a client thresholding it
gets the same mask as ``r.mask(t)``; a 16-bit PNG needs a per-map scale and rounds to 1/65535 of it); it
decodes in one line anywhere (``np.frombuffer(base64.b64decode(s), "<f4").reshape(shape)``, or
``new Float32Array(bytes.buffer)`` in a browser); and browsers cannot read 16-bit PNG samples at all (a
canvas hands back 8 bits per channel), so the inspector page could not re-threshold from one. The price is
size: 4 bytes a pixel (256 KiB for the paper's 256 × 256 map, a third more as base64), about twice a 16-bit
PNG; a client that needs only scores asks ``?map=false``.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from clipfusion.outputs import report

MAP_DTYPE = "float32"
MAP_BYTE_ORDER = "little"


def encode_map(anomaly_map: np.ndarray) -> dict[str, Any]:
    """``{"dtype": "float32", "byte_order": "little", "shape": [h, w], "data": base64}``."""
    values = np.ascontiguousarray(anomaly_map, dtype="<f4")
    return {
        "dtype": MAP_DTYPE,
        "byte_order": MAP_BYTE_ORDER,
        "shape": list(values.shape),
        "data": base64.b64encode(values.tobytes()).decode("ascii"),
    }


def decode_map(encoded: dict[str, Any]) -> np.ndarray:
    """The inverse of :func:`encode_map`: what a Python client does with a response's ``anomaly_map``."""
    if encoded.get("dtype") != MAP_DTYPE or encoded.get("byte_order") != MAP_BYTE_ORDER:
        raise ValueError(f"not a {MAP_BYTE_ORDER}-endian {MAP_DTYPE} map: {encoded.get('dtype')!r}")
    shape = tuple(int(n) for n in encoded["shape"])
    return np.frombuffer(base64.b64decode(encoded["data"]), dtype="<f4").reshape(shape).astype(np.float32)


def overlay_png(
    image: Image.Image,
    anomaly_map: np.ndarray,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    max_side: int = 1024,
    weights_note: str = "",
) -> bytes:
    """The heat map over the image, as the report draws it (same colour map and blending), as PNG bytes.

    The colour scale is the map's own minimum and maximum unless ``vmin``/``vmax`` fix it (a client comparing
    images across requests wants one scale; a request alone cannot know the others). The overlay is drawn at
    the image's size reduced to ``max_side`` on its longer side: a 4096-pixel overlay would be tens of MB of
    base64 for no visible gain. ``weights_note`` goes into a PNG text chunk, as in a prediction run's files.
    """
    lo = float(anomaly_map.min()) if vmin is None else vmin
    hi = float(anomaly_map.max()) if vmax is None else vmax
    base = image
    if max(image.size) > max_side:
        base = image.copy()
        base.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    over = report.overlay(base, report.normalise(anomaly_map, lo, hi))
    info = None
    if weights_note:
        info = PngInfo()
        info.add_text("clipfusion-weights", weights_note)
    buf = io.BytesIO()
    over.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


__all__ = ["decode_map", "encode_map", "overlay_png"]
