"""Reading images and ground-truth masks the same way whatever camera or tool wrote them.

Benchmarks and users' folders mix 8- and 16-bit, grayscale, palette, alpha, CMYK and EXIF-rotated files.
Everything downstream expects an RGB image in the orientation a person sees, so the normalisation happens
once, here. A file that cannot be used raises :class:`InputError` with the one line ``"<path>: <problem>"``
instead of a Pillow traceback deep inside a model.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipfusion.errors import ConfigError, InputError

#: Images are refused above this many pixels (a 20000 × 20000 line-scan frame passes; a crafted 10⁵ × 10⁵
#: PNG that would need 30 GB does not). Pillow's own, lower bomb limit is replaced by this one.
MAX_PIXELS = 400_000_000
#: Larger images are reduced to this longer side when read: the models see at most 512 px, and overlays
#: and reports do not need more, so memory stays bounded whatever the camera.
MAX_SIDE = 4096
#: What the detector and the CLI ask of an image (``load_image(path, min_side=MIN_SIDE)``): smaller images
#: carry too little to upsample to the models' input size meaningfully.
MIN_SIDE = 32

#: what the detector takes for one image: a file path, or a PIL image already in memory
ImageLike = str | Path | Image.Image


class ImageTooLargeError(InputError):
    """An image over :data:`MAX_PIXELS` (or a possible decompression bomb): a server answers 413 for it,
    400 for the other :class:`InputError` problems."""


def _fail(path: Path | str, problem: str, kind: type[InputError] = InputError) -> InputError:
    one_line = " ".join(str(problem).split())
    return kind(f"{path}: {one_line}")


def _open_fully(path: str | Path) -> Image.Image:
    """Open and decode the whole file, so truncation or corruption surfaces here and not mid-batch."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "file not found")
    if path.is_dir():
        raise _fail(path, "is a folder, not an image file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _fail(path, f"cannot read file ({exc.strerror or exc})") from exc
    if size == 0:
        raise _fail(path, "empty file (0 bytes)")
    return _decode(path, path)


def _decode(source: Path | io.BytesIO, name: Path | str) -> Image.Image:
    """Decode a file or in-memory bytes fully; errors name ``name``.

    Decompression-bomb protection: the header's size is checked against :data:`MAX_PIXELS` before any
    pixel is decoded; JPEGs over :data:`MAX_SIDE` are decoded at a reduced scale (``draft``), so a large
    camera frame costs a fraction of its full size in memory.
    """
    saved_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit below; Pillow's would refuse legitimate large frames
    try:
        image = Image.open(source)
    except UnidentifiedImageError as exc:
        raise _fail(name, "not an image file Pillow can read (unknown or corrupt format)") from exc
    except Image.DecompressionBombError as exc:
        raise _fail(
            name, f"image too large, refused as a possible decompression bomb ({exc})", ImageTooLargeError
        ) from exc
    except OSError as exc:
        raise _fail(name, f"cannot open image ({exc.strerror or exc})") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise _fail(
            name,
            f"image too large ({width}×{height} pixels; the limit is {MAX_PIXELS // 10**6} megapixels)",
            ImageTooLargeError,
        )
    if max(width, height) > MAX_SIDE and image.format == "JPEG":
        image.draft(image.mode, (MAX_SIDE, MAX_SIDE))
    try:
        image.load()
        # EXIF orientation: cameras store the sensor's pixels and a rotation flag; people (and masks drawn
        # by people) see the rotated image.
        transposed = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:
        image.close()
        raise _fail(
            name, f"image too large, refused as a possible decompression bomb ({exc})", ImageTooLargeError
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        image.close()
        raise _fail(name, f"truncated or corrupt image data ({exc})") from exc
    except Exception as exc:  # Pillow plugins raise arbitrary errors on malformed data
        image.close()
        raise _fail(name, f"corrupt image data ({type(exc).__name__}: {exc})") from exc
    if transposed is not image:
        image.close()
    return transposed


def _to_uint8(values: np.ndarray, *, full_scale: float | None) -> np.ndarray:
    """Map high-bit-depth values to 0..255 by scaling, never by clipping (Pillow's own ``convert`` clips)."""
    values = values.astype(np.float64)
    if full_scale is not None:
        scaled = values * (255.0 / full_scale)
    else:
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _high_bit_depth_gray_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale → 8-bit grayscale.

    ``I;16*`` is scaled by 255/65535. ``I`` (32-bit integers, which is how many readers store 16-bit data)
    is treated as 16-bit when its values lie in 0..65535, otherwise min–max normalised. ``F`` is taken as
    0..1 when its values lie there, otherwise min–max normalised.
    """
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(values, full_scale=65535.0))
    if image.mode == "I":
        in_16_bit = values.size == 0 or (values.min() >= 0 and values.max() <= 65535)
        return Image.fromarray(_to_uint8(values, full_scale=65535.0 if in_16_bit else None))
    finite = values[np.isfinite(values)]
    in_unit = finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0)
    return Image.fromarray(_to_uint8(values, full_scale=1.0 if in_unit else None))


def load_image(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Read an image as an 8-bit RGB PIL image, upright.

    - Grayscale (``1``, ``L``, 16-bit ``I;16``, 32-bit ``I``, float ``F``) is replicated into three channels;
      high bit depths are scaled to 8 bits, not clipped.
    - 16-bit RGB files are reduced to their high byte by Pillow when it decodes them (a proper scaling).
    - Palette images are expanded through their palette.
    - Alpha (``LA``, ``RGBA``, ``PA``, transparent palettes) is dropped, not composited: the colour channels
      hold what the camera saw, and compositing would paint transparent regions a colour no reference has.
    - CMYK, YCbCr and other colour modes go through Pillow's conversion to RGB.
    - EXIF orientation is applied (``ImageOps.exif_transpose``).

    - Images over :data:`MAX_SIDE` on the longer side are reduced to it (aspect kept).

    Raises :class:`InputError` ``"<path>: <problem>"`` for a missing, empty, truncated, corrupt or non-image
    file, one over :data:`MAX_PIXELS`, or one with a side under ``min_side`` when that is given.
    """
    path = Path(path)
    return _finish(_open_fully(path), path, min_side)


def load_image_bytes(data: bytes, name: str, min_side: int | None = None) -> Image.Image:
    """:func:`load_image` for bytes held in memory (an upload): the same decoding, conversions and checks,
    with ``name`` in the error messages. Nothing touches the file system."""
    if len(data) == 0:
        raise _fail(name, "empty file (0 bytes)")
    return _finish(_decode(io.BytesIO(data), name), name, min_side)


def open_image_like(item: ImageLike) -> tuple[Image.Image, str | None]:
    """An image the detector was given, as RGB, with its path (``None`` for an in-memory image): a file is
    read by :func:`load_image`, a PIL image converted; either way one under :data:`MIN_SIDE` a side is
    refused with one line."""
    if isinstance(item, Image.Image):
        if min(item.size) < MIN_SIDE:
            width, height = item.size
            raise InputError(f"<PIL image {width}×{height}>: image too small (at least {MIN_SIDE} px a side)")
        return item.convert("RGB"), None
    return load_image(item, min_side=MIN_SIDE), str(item)


def _finish(image: Image.Image, path: Path | str, min_side: int | None) -> Image.Image:
    if min_side is not None and min(image.size) < min_side:
        width, height = image.size
        raise _fail(
            path, f"image too small ({width}×{height} pixels; at least {min_side} per side are needed)"
        )
    try:
        rgb = _to_rgb(image)
    except (ValueError, OSError) as exc:
        raise _fail(path, f"cannot convert image mode {image.mode} to RGB ({exc})") from exc
    if max(rgb.size) > MAX_SIDE:
        rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return rgb


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_bit_depth_gray_to_l(image).convert("RGB")
    if mode in ("P", "PA"):
        return image.convert("RGBA").convert("RGB")
    if mode in ("LA", "La"):
        return image.convert("L").convert("RGB")
    return image.convert("RGB")


def _is_width_height(size: object) -> bool:
    return (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)
    )


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as a boolean array of shape (H, W): anomalous wherever the file is non-zero.

    Non-zero, not 255: VisA masks hold small integer region labels (1, 2, ...), and a threshold at 128 would
    silently drop them. Palette masks are read by palette *index* (index 0 = normal), the usual convention
    for label images. Colour masks are anomalous where any colour channel is non-zero; alpha is ignored.
    ``size=(W, H)`` resizes with nearest neighbour so that no new label values (or half-anomalous pixels)
    appear. Errors as in :func:`load_image`.
    """
    path = Path(path)
    if size is not None and not _is_width_height(size):
        raise ConfigError(f"mask size must be (width, height) with positive integers; got {size!r}")
    image = _open_fully(path)
    values = np.asarray(image)
    if values.ndim == 3:
        n_colour = (
            3 if image.mode in ("RGBA", "RGBa", "RGBX") else (1 if image.mode in ("LA", "La", "PA") else None)
        )
        values = values[..., :n_colour] if n_colour is not None else values
        mask = np.any(values != 0, axis=-1)
    else:
        mask = values != 0
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(tuple(size), Image.Resampling.NEAREST)
        mask = np.asarray(resized) != 0
    return np.ascontiguousarray(mask, dtype=bool)
