"""Benchmark metrics: image and pixel AUROC, AP, F1-max and AUPRO, exact and from one sort.

Definitions are those of the papers this project compares with (see ``docs/METHOD.md``, "Evaluation
protocol"): AUROC and AP as scikit-learn's ``roc_auc_score`` and ``average_precision_score``, F1-max as the
best ``2PR/(P+R)`` over the precision-recall curve, and AUPRO as the MVTec AD reference evaluation (per-region
overlap of 8-connected ground-truth components against the false-positive rate on normal pixels, integrated
to FPR 0.3 and divided by 0.3). Nothing is subsampled: every distinct score is a threshold, and tied scores
form one threshold (only the last of a run of equal scores is a point of the curves).

Why this is fast and lean. A benchmark category holds tens of millions of pixels; ``np.argsort`` on 33 M
float32 values takes seconds and its int64 result is twice the size of the data. Instead each score is
mapped to a 32-bit key that sorts in descending-score order and packed with the pixel's region id
(0 = normal pixel, r >= 1 = r-th ground-truth region) into one uint64; a plain ``np.sort`` of that array
(SIMD-accelerated in NumPy) is an order of magnitude faster than an argsort, and afterwards the key half
says where ties end and the id half says what each pixel is. All four metrics are then read from the
threshold groups that contain anomalous pixels: between two such groups only normal pixels pass, so every
curve is either flat or linear there, and the number of such groups is bounded by the number of anomalous
pixels, not of all pixels. Scores that float32 cannot hold exactly (float64 maps with more precision) fall
back to a float64 argsort with the same bookkeeping, so the result is exact in every case.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from clipfusion.errors import MetricError

__all__ = [
    "PixelScorer",
    "aupro",
    "auroc",
    "average_precision",
    "f1_max",
    "image_metrics",
    "pixel_metrics",
]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_KEY_MASK = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
# float types whose every value float32 represents exactly; other numeric types are checked map by map
_FLOAT32_EXACT = {
    np.dtype(t) for t in (np.float16, np.float32, np.bool_, np.int8, np.uint8, np.int16, np.uint16)
}


# ----------------------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """Array view of a NumPy array, torch tensor (any device, bfloat16 included) or nested list."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch here
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; float32 holds every value exactly
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def _check_numeric(a: np.ndarray, what: str) -> None:
    if a.dtype.kind not in "biuf":
        raise MetricError(f"{what} must be numeric or bool, got dtype {a.dtype}")


def _as_map_list(x: Any, what: str) -> list[np.ndarray]:
    """A list of 2-D arrays from an (N, H, W) array/tensor or a sequence of 2-D arrays/tensors."""
    if isinstance(x, (list, tuple)):
        maps = [_to_numpy(m) for m in x]
    else:
        a = _to_numpy(x)
        if a.ndim != 3:
            raise MetricError(
                f"{what} must be an (N, H, W) array or a list of 2-D arrays, got shape {tuple(a.shape)}"
            )
        maps = list(a)
    if not maps:
        raise MetricError(f"no {what} given (empty input)")
    for i, m in enumerate(maps):
        if m.ndim != 2:
            raise MetricError(f"{what} {i} must be 2-D (H, W), got shape {tuple(m.shape)}")
        _check_numeric(m, what)
    return maps


def _nonfinite_counts(a: np.ndarray) -> tuple[int, int]:
    """(NaN count, inf count); cheap when everything is finite, which is the common case."""
    if a.dtype.kind != "f" or np.isfinite(a).all():
        return 0, 0
    n_nan = int(np.isnan(a).sum())
    return n_nan, int(a.size - np.isfinite(a).sum() - n_nan)


def _float32_exact(a: np.ndarray) -> bool:
    if a.dtype in _FLOAT32_EXACT:
        return True
    return bool(np.array_equal(a.astype(np.float32), a))


def _check_max_fpr(max_fpr: float) -> float:
    max_fpr = float(max_fpr)
    if not 0.0 < max_fpr <= 1.0:
        raise MetricError(f"max_fpr must be in (0, 1], got {max_fpr}")
    return max_fpr


# ----------------------------------------------------------------------------------------------------------
# packed keys
# ----------------------------------------------------------------------------------------------------------


def _descending_key(scores: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is the descending order of float32 ``scores`` (finite, any sign).

    IEEE-754 bits of a non-negative float grow with its value, those of a negative float grow with its
    magnitude; flipping the low 31 bits of the non-negative ones (and adding 0.0 first so that -0.0 and 0.0
    become one tie, as they compare equal) yields an order-reversing key without any branch per element.
    """
    s = np.ascontiguousarray(scores, dtype=np.float32) + np.float32(0.0)
    b = s.view(np.uint32)
    return b ^ ((b >> np.uint32(31)) ^ np.uint32(1)) * np.uint32(0x7FFFFFFF)


def _fill_packed(out: np.ndarray, scores: np.ndarray, ids: np.ndarray | None) -> None:
    out[:] = _descending_key(scores.ravel())
    out <<= _SHIFT
    if ids is not None:
        out |= ids.ravel()


def _key_words(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score-key half, id half) of packed uint64 keys, as strided views: no copy of the big array."""
    words = keys.view(np.uint32)
    if sys.byteorder == "little":
        return words[1::2], words[0::2]
    return words[0::2], words[1::2]


# ----------------------------------------------------------------------------------------------------------
# ranking: the one sort and the threshold groups that contain anomalous items
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Ranking:
    """What the metrics need from one descending sort of all scores.

    Only threshold groups (runs of equal score) that contain at least one anomalous item are kept, in
    descending-score order; everything else is implied by the totals ``n_pos``/``n_neg``.
    """

    n_pos: int
    n_neg: int
    end: np.ndarray  # items ranked at or above the group's score (= TP + FP at that threshold)
    tps: np.ndarray  # anomalous items ranked at or above it (TP)
    fps: np.ndarray  # normal items ranked at or above it (FP)
    pos: np.ndarray  # anomalous items in the group
    neg: np.ndarray  # normal items in the group (tied with anomalous ones)
    last_pos: np.ndarray  # index, among the anomalous items in sorted order, of the group's last one
    ids_pos: np.ndarray  # region id of every anomalous item in sorted order (image level: all 1)

    def auroc(self) -> float:
        # The trapezoid under the ROC in its Mann-Whitney form: each anomalous item beats the normal items
        # ranked strictly below it and half of those tied with it. Only groups holding anomalous items add
        # anything, and integer sums keep it exact (the total is below 2 * n_pos * n_neg < 2**63).
        twice = 2 * int(np.dot(self.pos, self.n_neg - self.fps)) + int(np.dot(self.pos, self.neg))
        return _unit(twice / (2.0 * self.n_pos * self.n_neg))

    def average_precision(self) -> float:
        # sum over thresholds of (R_n - R_{n-1}) * P_n; recall only moves at groups with anomalous items
        return _unit(float(np.dot(self.pos, self.tps / self.end)) / self.n_pos)

    def f1_max(self) -> float:
        # 2PR/(P+R) = 2TP/(TP+FP+P_total). For a fixed TP it falls as FP grows, so over a run of thresholds
        # that adds no anomalous item the best is the run's first threshold, which is one of the kept groups.
        return _unit(float(np.max(2.0 * self.tps / (self.end + self.n_pos))))

    def aupro(self, region_sizes: np.ndarray, max_fpr: float) -> float:
        # Curve: (0, 0), then per kept group a flat run (only normal pixels pass) to the FPR where the group
        # starts and the group's own segment, then flat to (1, 1). The thresholds without anomalous pixels all
        # lie on those flat runs, so the area is the same as over every threshold. Only the groups starting at
        # or below max_fpr, and the point after them, matter.
        n_groups = self.fps.size
        fpr_before = (self.fps - self.neg) / float(self.n_neg)
        m = int(np.searchsorted(fpr_before, max_fpr, side="right"))
        # Each anomalous pixel of region r weighs 1/(|r| R), so the cumulative weight down the sort is the
        # mean per-region overlap at that threshold.
        weights = np.concatenate(([0.0], 1.0 / (region_sizes.astype(np.float64) * region_sizes.size)))
        n_used = int(self.last_pos[m - 1]) + 1 if m else 0
        pro = np.cumsum(weights[self.ids_pos[:n_used]])[self.last_pos[:m]]
        np.minimum(pro, 1.0, out=pro)
        if m == n_groups:
            # after the last anomalous pixel the overlap is 1 by definition; pinning it keeps summation
            # round-off from leaving a perfect map at 0.9999999999999998
            pro[-1] = 1.0
        x = np.empty(2 * m + 2)
        y = np.empty_like(x)
        x[0] = y[0] = 0.0
        x[1:-1:2], x[2:-1:2] = fpr_before[:m], self.fps[:m] / float(self.n_neg)
        y[1:-1:2], y[2:-1:2] = np.concatenate(([0.0], pro))[:m], pro
        if m < n_groups:
            x[-1], y[-1] = fpr_before[m], (pro[-1] if m else 0.0)
        else:
            x[-1], y[-1] = 1.0, 1.0
        return _unit(_trapezoid_to(x, y, max_fpr) / max_fpr)


def _unit(v: float) -> float:
    """Clamp float round-off (1 + 1e-16) so that results are fractions in [0, 1] as documented."""
    return float(min(1.0, max(0.0, v)))


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline (x non-decreasing) from x[0] to x_max, interpolated linearly at x_max.

    The same rule as the MVTec AD evaluation's ``trapezoid_area``: points at or below the limit are
    integrated as they are, the segment crossing it contributes up to the interpolated value.
    """
    k = int(np.searchsorted(x, x_max, side="right"))
    area = float(np.sum(0.5 * (y[1:k] + y[: k - 1]) * (x[1:k] - x[: k - 1])))
    if k < x.size:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def _ranking_from_packed(keys: np.ndarray) -> _Ranking:
    """Sort packed keys in place and keep the threshold groups that hold anomalous items."""
    keys.sort()
    ids = _key_words(keys)[1]
    pos_idx = np.flatnonzero(ids != 0)
    ids_pos = ids[pos_idx]
    group_of_pos = keys[pos_idx] >> _SHIFT
    del pos_idx
    last_pos = np.append(np.flatnonzero(group_of_pos[1:] != group_of_pos[:-1]), group_of_pos.size - 1)
    group_key = group_of_pos[last_pos] << _SHIFT
    del group_of_pos
    start = np.searchsorted(keys, group_key, side="left")
    end = np.searchsorted(keys, group_key | _KEY_MASK, side="right")
    return _make_ranking(keys.size, ids_pos, last_pos, start, end)


def _ranking_from_float64(scores: np.ndarray, ids: np.ndarray, *, owned: bool = False) -> _Ranking:
    """Exact fallback for scores that float32 cannot hold: a float64 argsort with the same bookkeeping.

    About five times slower than the packed sort on benchmark-sized data (argsort plus two gathers), and it
    holds the negated scores, the order and the sorted ids at once; float32 maps never come here.
    """
    # our own float64 buffer is negated in place rather than copied
    scores = scores.astype(np.float64, copy=False).ravel()
    neg = np.negative(scores, out=scores if owned else None)
    order = np.argsort(neg)
    neg = neg[order]
    ids_sorted = ids.ravel()[order]
    del order
    pos_idx = np.flatnonzero(ids_sorted != 0)
    ids_pos = ids_sorted[pos_idx]
    del ids_sorted
    score_of_pos = neg[pos_idx]
    del pos_idx
    last_pos = np.append(np.flatnonzero(score_of_pos[1:] != score_of_pos[:-1]), score_of_pos.size - 1)
    group_score = score_of_pos[last_pos]
    del score_of_pos
    start = np.searchsorted(neg, group_score, side="left")
    end = np.searchsorted(neg, group_score, side="right")
    return _make_ranking(neg.size, ids_pos, last_pos, start, end)


def _make_ranking(
    n: int, ids_pos: np.ndarray, last_pos: np.ndarray, start: np.ndarray, end: np.ndarray
) -> _Ranking:
    end = end.astype(np.int64, copy=False)
    tps = last_pos.astype(np.int64) + 1
    pos = np.diff(tps, prepend=0)
    neg = end - start  # group size for now
    neg -= pos
    return _Ranking(
        n_pos=int(ids_pos.size),
        n_neg=int(n - ids_pos.size),
        end=end,
        tps=tps,
        fps=end - tps,
        pos=pos,
        neg=neg,
        last_pos=last_pos,
        ids_pos=ids_pos,
    )


# ----------------------------------------------------------------------------------------------------------
# image level
# ----------------------------------------------------------------------------------------------------------


def _image_ranking(labels: Any, scores: Any) -> _Ranking:
    lab = _to_numpy(labels)
    sc = _to_numpy(scores)
    _check_numeric(lab, "labels")
    _check_numeric(sc, "scores")
    if lab.size == 0 or sc.size == 0:
        raise MetricError(f"empty input: got {lab.size} labels and {sc.size} scores")
    if lab.shape != sc.shape:
        if lab.ndim == 1 and sc.ndim == 1:
            raise MetricError(f"got {lab.size} labels but {sc.size} scores")
        raise MetricError(f"labels have shape {tuple(lab.shape)} but scores have shape {tuple(sc.shape)}")
    lab = lab.ravel()
    sc = sc.ravel()
    if lab.dtype.kind == "f" and not np.isfinite(lab).all():
        raise MetricError(f"labels contain {int((~np.isfinite(lab)).sum())} NaN or inf values")
    n_nan, n_inf = _nonfinite_counts(sc)
    if n_nan or n_inf:
        first = int(np.flatnonzero(~np.isfinite(sc))[0])
        raise MetricError(f"scores contain {n_nan} NaN and {n_inf} inf values (first at index {first})")
    ids = (lab != 0).astype(np.uint32)
    n_pos = int(ids.sum())
    if n_pos == 0:
        raise MetricError(
            f"all {lab.size} labels are normal (0): the metrics need normal and anomalous items"
        )
    if n_pos == lab.size:
        raise MetricError(f"all {lab.size} labels are anomalous: the metrics need normal and anomalous items")
    if not _float32_exact(sc):
        return _ranking_from_float64(sc, ids)
    keys = np.empty(sc.size, dtype=np.uint64)
    _fill_packed(keys, sc, ids)
    return _ranking_from_packed(keys)


def image_metrics(labels: Any, scores: Any) -> dict[str, float]:
    """Image-level AUROC, AP and F1-max of anomaly ``scores`` against ``labels`` (non-zero = anomalous).

    Accepts NumPy arrays, torch tensors or lists of equal shape; all three metrics share one sort.
    Raises :class:`MetricError` for empty or mismatched input, NaN/inf scores, or a single class.
    """
    r = _image_ranking(labels, scores)
    return {"auroc": r.auroc(), "ap": r.average_precision(), "f1_max": r.f1_max()}


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve, as scikit-learn's ``roc_auc_score`` (ties form one threshold)."""
    return _image_ranking(labels, scores).auroc()


def average_precision(labels: Any, scores: Any) -> float:
    """Average precision Σ (R_n − R_{n−1}) P_n, as scikit-learn's ``average_precision_score``."""
    return _image_ranking(labels, scores).average_precision()


def f1_max(labels: Any, scores: Any) -> float:
    """Best F1 = 2PR/(P+R) over all thresholds of the precision-recall curve (0 where P + R = 0)."""
    return _image_ranking(labels, scores).f1_max()


# ----------------------------------------------------------------------------------------------------------
# pixel level
# ----------------------------------------------------------------------------------------------------------


def _check_pairs(mask_list: list[np.ndarray], map_list: list[np.ndarray]) -> bool:
    """Validate masks against maps (counts, shapes, finite values, both classes present) before anything
    expensive, so that bad input fails fast and completely described; True when float32 holds every score."""
    if len(mask_list) != len(map_list):
        raise MetricError(f"got {len(mask_list)} masks but {len(map_list)} maps")
    n_total = n_pos = 0
    bad: list[tuple[int, int, int]] = []
    exact = True
    for i, (m, s) in enumerate(zip(mask_list, map_list, strict=True)):
        if m.shape != s.shape:
            raise MetricError(f"mask {i} has shape {tuple(m.shape)} but map {i} has shape {tuple(s.shape)}")
        if m.dtype.kind == "f" and not np.isfinite(m).all():
            raise MetricError(f"mask {i} contains NaN or inf values")
        n_nan, n_inf = _nonfinite_counts(s)
        if n_nan or n_inf:
            bad.append((i, n_nan, n_inf))
        elif exact:
            exact = _float32_exact(s)
        n_total += m.size
        n_pos += int(np.count_nonzero(m))
    if bad:
        tot_nan, tot_inf = sum(b[1] for b in bad), sum(b[2] for b in bad)
        i, n_nan, n_inf = bad[0]
        raise MetricError(
            f"maps contain {tot_nan} NaN and {tot_inf} inf values in {len(bad)} of {len(map_list)} maps, "
            f"first in map {i} ({n_nan} NaN, {n_inf} inf)"
        )
    if n_total == 0:
        raise MetricError("empty input: the maps hold no pixels")
    if n_pos == 0:
        raise MetricError(
            f"no anomalous pixel in any of the {len(mask_list)} masks: pixel metrics need normal and"
            " anomalous pixels"
        )
    if n_pos == n_total:
        raise MetricError(
            f"every pixel of the {len(mask_list)} masks is anomalous: pixel metrics need normal pixels too"
        )
    return exact


class _Regions:
    """Region ids of ground-truth masks, labelled on first use (8-connected; 0 = normal pixel, regions
    numbered across all masks), and the size of every region."""

    def __init__(self, mask_list: list[np.ndarray]) -> None:
        self._masks = mask_list
        self._ids: dict[int, np.ndarray | None] = {}
        self._sizes: list[np.ndarray] = []
        self._n_regions = 0

    def ids(self, i: int, *, keep: bool = False) -> np.ndarray | None:
        """Mask ``i``'s ids (masks are labelled in order); ``keep`` holds them for later calls."""
        if i in self._ids:
            return self._ids[i]
        binary = self._masks[i] != 0
        ids = None
        if binary.any():
            lab, k = ndimage.label(binary, structure=_EIGHT_CONNECTED)
            self._sizes.append(np.bincount(lab.ravel(), minlength=k + 1)[1:])
            ids = lab.astype(np.uint32)
            ids[binary] += np.uint32(self._n_regions)
            self._n_regions += k
        if keep:
            self._ids[i] = ids
        return ids

    def sizes(self) -> np.ndarray:
        return np.concatenate(self._sizes)


def _rank_pixels(
    map_list: list[np.ndarray], regions: _Regions, exact: bool, *, keep: bool = False
) -> _Ranking:
    """One ranking of all pixels of all maps, each pixel packed with its region id (labelled as needed)."""
    n_total = sum(s.size for s in map_list)
    offset = 0
    if exact:
        keys = np.empty(n_total, dtype=np.uint64)
        for i, s in enumerate(map_list):
            _fill_packed(keys[offset : offset + s.size], s, regions.ids(i, keep=keep))
            offset += s.size
        return _ranking_from_packed(keys)
    scores = np.empty(n_total, dtype=np.float64)
    ids_all = np.zeros(n_total, dtype=np.uint32)
    for i, s in enumerate(map_list):
        scores[offset : offset + s.size] = s.ravel()
        ids = regions.ids(i, keep=keep)
        if ids is not None:
            ids_all[offset : offset + s.size] = ids.ravel()
        offset += s.size
    return _ranking_from_float64(scores, ids_all, owned=True)


def _pixel_ranking(masks: Any, maps: Any) -> tuple[_Ranking, np.ndarray]:
    """One ranking of all pixels of all maps, with the sizes of the 8-connected ground-truth regions."""
    mask_list = _as_map_list(masks, "mask")
    map_list = _as_map_list(maps, "map")
    exact = _check_pairs(mask_list, map_list)
    regions = _Regions(mask_list)  # labelled map by map while packing: no second full-size array
    return _rank_pixels(map_list, regions, exact), regions.sizes()


class PixelScorer:
    """:func:`pixel_metrics` of many maps against the same masks, e.g. every point of an ablation sweep.

    The masks' 8-connected regions are labelled once, when the scorer is made, and kept (one uint32 per
    pixel of the anomalous images); each call checks its maps and costs one pass over them and one sort, and
    only reads the scorer, so threads may share it. ``scorer(maps)`` equals ``pixel_metrics(masks, maps)``,
    bit for bit.
    """

    def __init__(self, masks: Any, *, max_fpr: float = 0.3) -> None:
        self.max_fpr = _check_max_fpr(max_fpr)
        self._masks = _as_map_list(masks, "mask")
        self._regions = _Regions(self._masks)
        for i in range(len(self._masks)):
            self._regions.ids(i, keep=True)

    def __call__(self, maps: Any) -> dict[str, float]:
        map_list = _as_map_list(maps, "map")
        exact = _check_pairs(self._masks, map_list)
        r = _rank_pixels(map_list, self._regions, exact, keep=True)
        return {
            "auroc": r.auroc(),
            "ap": r.average_precision(),
            "f1_max": r.f1_max(),
            "aupro": r.aupro(self._regions.sizes(), self.max_fpr),
        }


def pixel_metrics(masks: Any, maps: Any, *, max_fpr: float = 0.3) -> dict[str, float]:
    """Pixel-level AUROC, AP, F1-max and AUPRO (to FPR ``max_fpr``) of anomaly ``maps`` against ``masks``.

    ``masks`` and ``maps`` are (N, H, W) arrays/tensors or lists of 2-D arrays (sizes may differ between
    images but must match pairwise); masks are anomalous wherever non-zero (bool, 0/1, 0/255, VisA labels).
    All four metrics come from one sort of all pixels. Raises :class:`MetricError` for degenerate input.
    """
    max_fpr = _check_max_fpr(max_fpr)
    r, sizes = _pixel_ranking(masks, maps)
    return {
        "auroc": r.auroc(),
        "ap": r.average_precision(),
        "f1_max": r.f1_max(),
        "aupro": r.aupro(sizes, max_fpr),
    }


def aupro(masks: Any, maps: Any, *, max_fpr: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to FPR ``max_fpr`` (MVTec AD definition).

    Regions are the 8-connected components of each mask; the overlap of a region at a threshold is the
    fraction of its pixels scored at or above it, averaged over all regions of all images; the FPR is over
    all normal pixels of all images. Use :func:`pixel_metrics` when the other pixel metrics are needed too.
    """
    max_fpr = _check_max_fpr(max_fpr)
    r, sizes = _pixel_ranking(masks, maps)
    return r.aupro(sizes, max_fpr)
