"""A procedurally generated anomaly-detection data set in the MVTec AD layout.

Tests, the demo and the benchmarks need data that exists everywhere, offline, in seconds, with exact
ground truth. The images imitate the two families of MVTec AD:

- textures: ``woven_fabric`` (a plain weave) and ``grainy_leather`` (grain and pores);
- objects: ``bottle_cap`` (a knurled cap seen from above, on a conveyor) and ``metal_plate`` (a brushed
  plate held by two brass screws).

Normal images vary the way photographs of a production line do: position, rotation, pattern phase, colour
and brightness, sensor noise. Anomalous images carry one of five defects, each painted only inside its own
mask, so the mask is exact: ``scratch``, ``spot``, ``hole``, ``stain`` and ``missing`` (a torn-away patch
of texture, a broken-off piece of the cap, a missing screw). Defects are meant to be obvious (about 1–8 % of
the image, clearly different in colour or texture) so that a nearest-neighbour detector on *random-weight*
features finds them, which lets the pipeline be tested end to end without pretrained weights.

Layout written under ``root``::

    <category>/train/good/000.png ...
    <category>/test/good/000.png ...
    <category>/test/<defect>/000.png ...
    <category>/ground_truth/<defect>/000_mask.png ...   (0 = normal, 255 = anomalous)

Read it with ``FolderDataset(root / category, split)``.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from clipfusion.errors import ConfigError, did_you_mean

SYNTHETIC_CATEGORIES: tuple[str, ...] = ("woven_fabric", "grainy_leather", "bottle_cap", "metal_plate")
SYNTHETIC_DEFECTS: tuple[str, ...] = ("scratch", "spot", "hole", "stain", "missing")

_MIN_IMAGE_SIZE = 32
_Colour = tuple[float, float, float]


@dataclass
class _Scene:
    """A rendered normal image and what the defect painters need to know about it."""

    image: np.ndarray  # (S, S, 3) float, 0..255
    surface: np.ndarray  # (S, S) bool: where a defect may lie (the product, not the background)
    missing: np.ndarray | None = None  # (S, S) bool: region of this scene's "missing part" defect
    missing_fill: np.ndarray | None = None  # (S, S, 3) what shows where the part is missing


@dataclass(frozen=True)
class _Style:
    render: Callable[[np.random.Generator, int, bool], _Scene]
    scratch: _Colour
    spot: _Colour
    stain: _Colour
    hole: _Colour = (16.0, 14.0, 13.0)


# --------------------------------------------------------------------------------------------------------
# small helpers


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return xx + 0.5, yy + 0.5


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation: grain, fibres, brushing."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return noise / max(float(noise.std()), 1e-6)


def _jitter(rng: np.random.Generator, colour: _Colour, amount: float) -> np.ndarray:
    return np.asarray(colour, np.float32) * (1.0 + rng.uniform(-amount, amount, 3).astype(np.float32))


def _rotate(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, theta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a frame centred at (cx, cy) and rotated by theta: rendering in this frame moves and
    turns the whole product without resampling (and blurring) a finished image."""
    c, s = np.cos(theta), np.sin(theta)
    dx, dy = xx - cx, yy - cy
    return (c * dx + s * dy).astype(np.float32), (-s * dx + c * dy).astype(np.float32)


def _polar_blob(
    xx: np.ndarray,
    yy: np.ndarray,
    cx: float,
    cy: float,
    radius: float,
    rng: np.random.Generator,
    wobble: float,
) -> np.ndarray:
    """An irregular closed region: a circle whose radius wanders with a few random harmonics."""
    r = np.hypot(xx - cx, yy - cy)
    a = np.arctan2(yy - cy, xx - cx)
    edge = np.ones_like(a)
    for harmonic in (2, 3, 5):
        edge += wobble / harmonic * rng.uniform(0.5, 1.0) * np.sin(harmonic * a + rng.uniform(0, 2 * np.pi))
    return r <= radius * edge


# --------------------------------------------------------------------------------------------------------
# normal scenes


def _render_woven(rng: np.random.Generator, size: int, missing: bool) -> _Scene:
    xx, yy = _grid(size)
    period = size / 11.0
    theta = np.deg2rad(rng.uniform(-3.0, 3.0))
    u, v = _rotate(xx, yy, *rng.uniform(0, 2 * period, 2), theta)
    iu, iv = np.floor(u / period), np.floor(v / period)
    fu, fv = u / period - iu, v / period - iv
    horizontal_on_top = ((iu + iv) % 2) == 0
    # a thread is bright along its middle and dark where it dives under its neighbour
    across_h, across_v = np.sin(np.pi * fv) ** 0.7, np.sin(np.pi * fu) ** 0.7
    along_h, along_v = 0.8 + 0.2 * np.sin(np.pi * fu), 0.8 + 0.2 * np.sin(np.pi * fv)
    shade = np.where(horizontal_on_top, (0.5 + 0.5 * across_h) * along_h, (0.5 + 0.5 * across_v) * along_v)
    fibres = _smooth_noise(rng, (size, size), 0.8)
    base = _jitter(rng, (176.0, 156.0, 116.0), 0.03)
    image = base * (shade * (1.0 + 0.05 * fibres))[..., None]

    scene = _Scene(image, np.ones((size, size), bool))
    if missing:
        # torn-away threads: only one direction of thread remains, over the dark backing
        w, h = rng.uniform(0.16, 0.24, 2) * size
        cx, cy = rng.uniform(0.25, 0.75, 2) * size
        region = _rotate(xx, yy, cx, cy, rng.uniform(0, np.pi))
        scene.missing = (np.abs(region[0]) <= w / 2) & (np.abs(region[1]) <= h / 2)
        backing = np.asarray((38.0, 30.0, 24.0), np.float32)
        loose = 0.35 * across_v**3
        scene.missing_fill = backing * (1.0 + 0.1 * fibres[..., None]) + (base - backing) * loose[..., None]
    return scene


def _render_leather(rng: np.random.Generator, size: int, missing: bool) -> _Scene:
    xx, yy = _grid(size)
    scale = size / 128.0
    grain = 0.6 * _smooth_noise(rng, (size, size), 1.0 * scale) + 0.4 * _smooth_noise(
        rng, (size, size), 3.0 * scale
    )
    pores = _smooth_noise(rng, (size, size), 0.7 * scale) > 2.4
    base = _jitter(rng, (118.0, 76.0, 48.0), 0.04)
    shade = (1.0 + 0.1 * grain) * np.where(pores, 0.75, 1.0)
    image = base * shade[..., None]

    scene = _Scene(image, np.ones((size, size), bool))
    if missing:
        cx, cy = rng.uniform(0.25, 0.75, 2) * size
        scene.missing = _polar_blob(xx, yy, cx, cy, rng.uniform(0.1, 0.13) * size, rng, 0.5)
        # a cut-out piece shows the pale suede underneath
        suede = np.asarray((214.0, 196.0, 160.0), np.float32)
        scene.missing_fill = suede * (1.0 + 0.05 * grain[..., None])
    return scene


def _render_cap(rng: np.random.Generator, size: int, missing: bool) -> _Scene:
    xx, yy = _grid(size)
    background = (
        _jitter(rng, (70.0, 84.0, 102.0), 0.04)
        * (1.0 + 0.04 * _smooth_noise(rng, (size, size), 2.0))[..., None]
    )
    cx, cy = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    radius = size * 0.34 * rng.uniform(0.98, 1.02)
    phi = np.deg2rad(rng.uniform(-35.0, 35.0) - 135.0)  # the capper leaves caps turned roughly alike
    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    angle = np.arctan2(dy, dx) - phi
    disc = r <= radius

    shadow = (np.hypot(dx - 0.03 * size, dy - 0.03 * size) <= radius) & ~disc
    image = background * np.where(shadow, 0.6, 1.0)[..., None]

    paint = _jitter(rng, (178.0, 46.0, 40.0), 0.04)
    light = 1.0 - 0.18 * (dx + dy) / (2 * radius)  # lit from the upper left
    rim = r >= 0.86 * radius
    knurl = np.where(rim, 0.78 + 0.22 * np.cos(30 * angle), 1.0)
    groove = np.where(np.abs(r - 0.62 * radius) < 0.035 * radius, 0.72, 1.0)
    cap = paint * (light * knurl * groove)[..., None]
    # a printed white mark off-centre shows which way the cap is turned
    wrapped = np.angle(np.exp(1j * angle))
    mark = (r > 0.28 * radius) & (r < 0.42 * radius) & (np.abs(wrapped) < 0.7)
    cap = np.where(mark[..., None], np.asarray((232.0, 228.0, 218.0), np.float32) * light[..., None], cap)
    image = np.where(disc[..., None], cap, image)

    scene = _Scene(image, disc & (r <= 0.92 * radius))
    if missing:
        # a piece of the rim broken off: the dark inside of the jar shows through
        edge_angle = rng.uniform(0, 2 * np.pi)
        ex, ey = cx + radius * np.cos(edge_angle), cy + radius * np.sin(edge_angle)
        scene.missing = disc & _polar_blob(xx, yy, ex, ey, rng.uniform(0.3, 0.38) * radius, rng, 0.35)
        scene.missing_fill = np.broadcast_to(np.asarray((14.0, 12.0, 12.0), np.float32), image.shape)
    return scene


def _render_plate(rng: np.random.Generator, size: int, missing: bool) -> _Scene:
    xx, yy = _grid(size)
    background = (
        _jitter(rng, (40.0, 86.0, 78.0), 0.05)
        * (1.0 + 0.05 * _smooth_noise(rng, (size, size), 1.5))[..., None]
    )
    cx, cy = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    theta = np.deg2rad(rng.uniform(-4.0, 4.0))
    u, v = _rotate(xx, yy, cx, cy, theta)
    half_w, half_h, corner = 0.36 * size, 0.21 * size, 0.06 * size
    qu, qv = np.maximum(np.abs(u) - (half_w - corner), 0), np.maximum(np.abs(v) - (half_h - corner), 0)
    plate = np.hypot(qu, qv) <= corner

    # brushing runs along the plate, so it is a function of v only (plus fine noise)
    v_samples = np.arange(-size, size, dtype=np.float32)
    streaks = ndimage.gaussian_filter1d(rng.standard_normal(v_samples.size).astype(np.float32), 0.7)
    streaks /= max(float(streaks.std()), 1e-6)
    brushed = np.interp(v, v_samples, streaks).astype(np.float32)
    steel = _jitter(rng, (166.0, 169.0, 174.0), 0.03)
    shade = 1.0 + 0.06 * brushed + 0.02 * _smooth_noise(rng, (size, size), 0.8)
    inset = np.minimum(half_w - np.abs(u), half_h - np.abs(v))
    # chamfered edges: lit on the top and left, in shadow on the bottom and right
    facing_light = np.where(half_h - np.abs(v) < half_w - np.abs(u), v < 0, u < 0)
    bevel = np.where(inset < 0.02 * size, np.where(facing_light, 1.15, 0.78), 1.0)
    image = np.where(plate[..., None], steel * (shade * bevel)[..., None], background)

    screw_r = 0.055 * size
    screws = []
    for side in (-1.0, 1.0):
        su, sv = side * (half_w - 0.11 * size), 0.0
        du, dv = u - su, v - sv
        head = np.hypot(du, dv) <= screw_r
        spin = rng.uniform(0, np.pi)
        a, b = _rotate(du, dv, 0.0, 0.0, spin)
        slot = head & (np.minimum(np.abs(a), np.abs(b)) < 0.014 * size) & (np.hypot(a, b) < 0.75 * screw_r)
        brass = _jitter(rng, (206.0, 172.0, 92.0), 0.03) * (1.0 - 0.2 * (du + dv) / (2 * screw_r))[..., None]
        image = np.where(head[..., None], brass, image)
        image = np.where(slot[..., None], np.asarray((70.0, 58.0, 36.0), np.float32), image)
        screws.append((su, sv))

    eroded = plate & (inset > 0.05 * size)
    scene = _Scene(image, eroded)
    if missing:
        # a screw missing: the empty threaded hole
        su, sv = screws[int(rng.integers(0, 2))]
        dist = np.hypot(u - su, v - sv)
        scene.missing = dist <= screw_r + max(1.0, 0.01 * size)
        thread = 1.0 + 0.5 * (np.cos(dist * (2 * np.pi / max(2.0, 0.025 * size))) > 0.6)
        scene.missing_fill = np.asarray((18.0, 18.0, 20.0), np.float32) * thread[..., None]
    return scene


_STYLES: dict[str, _Style] = {
    "woven_fabric": _Style(_render_woven, scratch=(40, 34, 30), spot=(40, 70, 150), stain=(150, 40, 25)),
    "grainy_leather": _Style(
        _render_leather, scratch=(228, 214, 190), spot=(236, 236, 228), stain=(40, 80, 170)
    ),
    "bottle_cap": _Style(_render_cap, scratch=(238, 238, 242), spot=(60, 150, 60), stain=(230, 190, 40)),
    "metal_plate": _Style(_render_plate, scratch=(30, 30, 32), spot=(150, 60, 20), stain=(190, 110, 40)),
}


# --------------------------------------------------------------------------------------------------------
# defects: each returns its exact mask and paints only inside it


def _pick_centre(rng: np.random.Generator, surface: np.ndarray, size: int) -> tuple[float, float]:
    margin = int(0.12 * size)
    inner = np.zeros_like(surface)
    inner[margin : size - margin, margin : size - margin] = surface[
        margin : size - margin, margin : size - margin
    ]
    ys, xs = np.nonzero(inner if inner.any() else surface)
    i = int(rng.integers(0, ys.size))
    return float(xs[i]) + 0.5, float(ys[i]) + 0.5


def _scratch_mask(rng: np.random.Generator, scene: _Scene, size: int) -> np.ndarray:
    cx, cy = _pick_centre(rng, scene.surface, size)
    length = rng.uniform(0.35, 0.5) * size
    direction = rng.uniform(0, np.pi)
    ux, uy = np.cos(direction), np.sin(direction)
    bend = rng.uniform(-0.15, 0.15) * length
    points = []
    for t in np.linspace(-0.5, 0.5, 24):
        offset = bend * (1 - 4 * t * t)  # a gentle arc
        points.append((cx + t * length * ux - offset * uy, cy + t * length * uy + offset * ux))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).line(points, fill=255, width=max(2, round(size / 40)), joint="curve")
    return (np.asarray(canvas) > 0) & scene.surface


def _spot_mask(rng: np.random.Generator, scene: _Scene, size: int) -> np.ndarray:
    xx, yy = _grid(size)
    cx, cy = _pick_centre(rng, scene.surface, size)
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(2, 5))):
        sx, sy = cx + rng.normal(0, 0.06 * size), cy + rng.normal(0, 0.06 * size)
        mask |= np.hypot(xx - sx, yy - sy) <= rng.uniform(0.03, 0.045) * size
    return mask & scene.surface


def _hole_mask(rng: np.random.Generator, scene: _Scene, size: int) -> np.ndarray:
    xx, yy = _grid(size)
    cx, cy = _pick_centre(rng, scene.surface, size)
    return _polar_blob(xx, yy, cx, cy, rng.uniform(0.06, 0.08) * size, rng, 0.15) & scene.surface


def _stain_mask(rng: np.random.Generator, scene: _Scene, size: int) -> np.ndarray:
    xx, yy = _grid(size)
    cx, cy = _pick_centre(rng, scene.surface, size)
    return _polar_blob(xx, yy, cx, cy, rng.uniform(0.09, 0.12) * size, rng, 0.6) & scene.surface


def _paint(rng: np.random.Generator, scene: _Scene, style: _Style, defect: str, mask: np.ndarray) -> None:
    image, m = scene.image, mask[..., None]
    size = image.shape[0]
    if defect == "missing":
        assert scene.missing_fill is not None
        fill = scene.missing_fill
    elif defect == "stain":
        # translucent: the surface pattern shows through a strongly coloured film
        fill = 0.3 * image + 0.7 * _jitter(rng, style.stain, 0.05)
    elif defect == "hole":
        depth = 1.0 + 0.3 * _smooth_noise(rng, (size, size), 1.0)[..., None]
        fill = np.asarray(style.hole, np.float32) * depth
    else:
        colour = _jitter(rng, style.scratch if defect == "scratch" else style.spot, 0.05)
        fill = colour * (1.0 + 0.05 * _smooth_noise(rng, (size, size), 0.8))[..., None]
    scene.image = np.where(m, fill, image)


_MASKERS: dict[str, Callable[[np.random.Generator, _Scene, int], np.ndarray]] = {
    "scratch": _scratch_mask,
    "spot": _spot_mask,
    "hole": _hole_mask,
    "stain": _stain_mask,
    "missing": lambda rng, scene, size: scene.missing,  # type: ignore[return-value,arg-type]
}


def _photograph(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera effects applied to the whole finished image: exposure, white balance, shading, sensor noise."""
    size = image.shape[0]
    xx, yy = _grid(size)
    gain = (1.0 + rng.uniform(-0.05, 0.05)) * (1.0 + rng.uniform(-0.02, 0.02, 3)).astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    shading = 1.0 + 0.04 * ((xx - size / 2) * np.cos(direction) + (yy - size / 2) * np.sin(direction)) / size
    noise = 2.0 * rng.standard_normal(image.shape, dtype=np.float32)
    noisy = image * gain * shading[..., None] + noise
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _make_image(
    style: _Style, rng: np.random.Generator, size: int, defect: str | None
) -> tuple[np.ndarray, np.ndarray]:
    min_area, max_area = 0.006 * size * size, 0.1 * size * size
    for _ in range(20):
        scene = style.render(rng, size, defect == "missing")
        if defect is None:
            return _photograph(rng, scene.image), np.zeros((size, size), bool)
        mask = _MASKERS[defect](rng, scene, size)
        if min_area <= mask.sum() <= max_area:
            _paint(rng, scene, style, defect, mask)
            return _photograph(rng, scene.image), mask
    raise RuntimeError(
        f"could not place a {defect} defect in 20 tries (image size {size})"
    )  # pragma: no cover


# --------------------------------------------------------------------------------------------------------
# writing the data set


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    """Write beside the target, then rename: an interrupted run never leaves a half-written PNG.

    No fsync (unlike ``io_utils.atomic_write_bytes``): the data set is regenerated in a second from its
    seed, and a hundred fsyncs would double the generation time of the test fixture.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """One generator per image, keyed by names rather than positions: a category's images do not change
    when other categories are generated alongside it, or when n_test grows."""
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index]
    return np.random.default_rng(np.random.SeedSequence(key))


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def make_synthetic_dataset(
    root: str | Path,
    categories: Iterable[str] | None = None,
    n_train: int = 8,
    n_test: int = 12,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a synthetic MVTec-layout data set under ``root`` and return ``root``.

    For each category: ``n_train`` normal training images; ``n_test`` test images, ``n_test // 2`` of them
    normal and the rest anomalous, cycling through :data:`SYNTHETIC_DEFECTS` (all five defect kinds appear
    once ``n_test >= 10``). The same arguments give byte-identical files on a given platform; each image's
    content depends only on (seed, category, split, index, defect kind), so a subset of the categories
    gives the same files as the full set. Existing files at the same paths are overwritten (each
    atomically); nothing else under ``root`` is touched.
    """
    root = Path(root)
    if isinstance(categories, str):
        raise ConfigError(f"categories must be a list of names, not the string {categories!r}")
    chosen = list(dict.fromkeys(SYNTHETIC_CATEGORIES if categories is None else categories))
    unknown = [c for c in chosen if c not in SYNTHETIC_CATEGORIES]
    if unknown or not chosen:
        known = ", ".join(SYNTHETIC_CATEGORIES)
        hint = did_you_mean(unknown[0], SYNTHETIC_CATEGORIES) if len(unknown) == 1 else ""
        raise ConfigError(f"unknown synthetic categories {unknown or '(none given)'}; {hint}known: {known}")
    n_train = _check_count("n_train", n_train, 1)
    n_test = _check_count("n_test", n_test, 2)
    size = _check_count("image_size", image_size, _MIN_IMAGE_SIZE)
    seed = _check_count("seed", seed, 0)

    for category in chosen:
        style, folder = _STYLES[category], root / category
        for i in range(n_train):
            image, _ = _make_image(style, _rng(seed, category, "train", i), size, None)
            _write(folder / "train" / "good" / f"{i:03d}.png", _png(image))
        n_good = n_test // 2
        per_defect: dict[str, int] = {}
        for i in range(n_test):
            defect = None if i < n_good else SYNTHETIC_DEFECTS[(i - n_good) % len(SYNTHETIC_DEFECTS)]
            image, mask = _make_image(style, _rng(seed, category, "test", i), size, defect)
            name = defect or "good"
            index = per_defect.get(name, 0)
            per_defect[name] = index + 1
            _write(folder / "test" / name / f"{index:03d}.png", _png(image))
            if defect is not None:
                mask_png = _png(mask.astype(np.uint8) * 255)
                _write(folder / "ground_truth" / name / f"{index:03d}_mask.png", mask_png)
    return root
