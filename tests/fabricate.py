"""Fabricated image files for data tests: small random RGB images, hand-written 16-bit PNGs and MVTec-layout
categories, all written into a test's tmp_path."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def save_image(path: Path, array: np.ndarray, mode: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path, **kwargs)
    return path


def random_rgb(seed: int, size: tuple[int, int] = (16, 12)) -> np.ndarray:
    w, h = size
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_16bit_rgb(array: np.ndarray) -> bytes:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def make_mvtec_category(root: Path, category: str, *, gray: bool = False, defects=("crack",)) -> None:
    def image(seed: int) -> np.ndarray:
        rgb = random_rgb(seed)
        return rgb[..., 0] if gray else rgb

    for i in range(3):
        save_image(root / category / "train" / "good" / f"{i:03d}.png", image(i))
    for i in range(2):
        save_image(root / category / "test" / "good" / f"{i:03d}.png", image(10 + i))
    for d, defect in enumerate(defects):
        for i in range(2):
            save_image(root / category / "test" / defect / f"{i:03d}.png", image(20 + 10 * d + i))
            mask = np.zeros((12, 16), np.uint8)
            mask[2:5, 3 + i : 8] = 255
            save_image(root / category / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
