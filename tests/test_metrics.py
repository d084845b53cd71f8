"""Metrics against scikit-learn, against a slow reference AUPRO, on hand-worked cases, and on bad input."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from clipfusion.errors import MetricError
from clipfusion.metrics import aupro, auroc, average_precision, f1_max, image_metrics, pixel_metrics

# ----------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------


def sk_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    labels = np.asarray(labels).ravel() != 0
    scores = np.asarray(scores).ravel()
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return {
        "auroc": roc_auc_score(labels, scores),
        "ap": average_precision_score(labels, scores),
        "f1_max": float(f1.max()),
    }


def components_8(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components by flood fill, written out so that it does not share code with the library."""
    mask = mask != 0
    seen = np.zeros_like(mask)
    out = []
    h, w = mask.shape
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                comp = np.zeros_like(mask)
                stack = [(i, j)]
                seen[i, j] = True
                while stack:
                    a, b = stack.pop()
                    comp[a, b] = True
                    for da in (-1, 0, 1):
                        for db in (-1, 0, 1):
                            y, x = a + da, b + db
                            if 0 <= y < h and 0 <= x < w and mask[y, x] and not seen[y, x]:
                                seen[y, x] = True
                                stack.append((y, x))
                out.append(comp)
    return out


def slow_aupro(masks, maps, max_fpr: float = 0.3) -> float:
    """Threshold at every distinct score, measure overlaps and FPR with boolean masks, integrate to limit."""
    regions = [(i, c) for i, m in enumerate(masks) for c in components_8(m)]
    normal = [m == 0 for m in masks]
    n_normal = sum(int(n.sum()) for n in normal)
    xs, ys = [0.0], [0.0]
    for t in sorted({float(v) for s in maps for v in np.ravel(s)}, reverse=True):
        pred = [s >= t for s in maps]
        ys.append(float(np.mean([pred[i][c].mean() for i, c in regions])))
        xs.append(sum(int((p & n).sum()) for p, n in zip(pred, normal, strict=True)) / n_normal)
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:], strict=True):
        if x0 >= max_fpr:
            break
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_at = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y_at) / 2
            break
    return area / max_fpr


def random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Rectangles, single pixels and diagonal-only neighbours; every third image has no defect."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if i % 3 == 2:
            continue
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        masks[i, y, x] = masks[i, y + 1, x + 1] = True  # touching only at a corner
    return masks


def random_maps(rng: np.random.Generator, masks: np.ndarray, decimals: int) -> np.ndarray:
    return np.round(rng.random(masks.shape) + 0.4 * masks, decimals).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# agreement with scikit-learn
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_image_metrics_match_sklearn(dtype, decimals):
    rng = np.random.default_rng(0 if decimals is None else decimals)
    for _ in range(5):
        n = int(rng.integers(5, 300))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = rng.normal(size=n) + 0.7 * labels
        if decimals is not None:
            scores = np.round(scores, decimals)
        scores = scores.astype(dtype)
        got, want = image_metrics(labels, scores), sk_metrics(labels, scores)
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-6), k
        assert auroc(labels, scores) == got["auroc"]
        assert average_precision(labels, scores) == got["ap"]
        assert f1_max(labels, scores) == got["f1_max"]
        assert all(type(v) is float for v in got.values())


def test_float32_keys_order_mixed_signs_magnitudes_and_signed_zero():
    # the packed sort key must order negative, tiny, huge, -0.0 and 0.0 exactly as the floats compare
    rng = np.random.default_rng(3)
    n = 2000
    scores = (rng.normal(size=n) * 10.0 ** rng.uniform(-30, 30, n)).astype(np.float32)
    scores[:200] = rng.choice(np.array([-0.0, 0.0, 1.0, -1.0], dtype=np.float32), 200)
    # runs of adjacent float32 values (1 ulp apart) around 1, -1 and 0 (subnormals of both signs)
    ulps = np.arange(64, dtype=np.uint32)
    starts = np.array([1.0, -1.0, 0.0, -0.0], dtype=np.float32).view(np.uint32)
    scores[200:456] = (starts[:, None] + ulps).ravel().view(np.float32)
    scores = rng.permutation(scores)
    labels = rng.integers(0, 2, n)
    got, want = image_metrics(labels, scores), sk_metrics(labels, scores)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


@pytest.mark.parametrize("decimals", [1, 2, 6])
def test_pixel_metrics_match_sklearn(decimals):
    rng = np.random.default_rng(decimals)
    masks = random_masks(rng, 6, 20, 24)
    maps = random_maps(rng, masks, decimals)
    got, want = pixel_metrics(masks, maps), sk_metrics(masks, maps)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


def test_pixel_metrics_float64_beyond_float32_precision_stays_exact():
    # differences of 1e-12 vanish in float32; the float64 fallback must still see them as distinct
    rng = np.random.default_rng(5)
    masks = random_masks(rng, 4, 16, 16)
    maps = np.round(rng.random(masks.shape), 1) + 1e-12 * rng.integers(0, 50, masks.shape) + 0.2 * masks
    before = maps.copy()
    got, want = pixel_metrics(masks, maps), sk_metrics(masks, maps)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
    labels, scores = masks.reshape(-1)[:300], maps.reshape(-1)[:300]
    assert image_metrics(labels, scores) == pytest.approx(sk_metrics(labels, scores), abs=1e-9)
    np.testing.assert_array_equal(maps, before)  # the caller's arrays are never written to
    assert got["aupro"] == pytest.approx(slow_aupro(masks, maps), abs=1e-9)


def test_input_kinds_agree():
    import torch  # only here: the metrics themselves never import torch

    rng = np.random.default_rng(7)
    masks = random_masks(rng, 3, 12, 12)
    maps = random_maps(rng, masks, 2)
    ref = pixel_metrics(masks, maps)
    assert pixel_metrics(masks.astype(np.uint8) * 255, maps) == ref  # MVTec 0/255
    assert pixel_metrics(masks.astype(np.uint8) * 3, maps) == ref  # VisA small labels
    assert pixel_metrics(torch.from_numpy(masks), torch.from_numpy(maps)) == ref
    assert pixel_metrics(list(masks), [torch.from_numpy(m) for m in maps]) == ref
    assert pixel_metrics(masks, torch.from_numpy(maps).to(torch.bfloat16)) == pytest.approx(
        pixel_metrics(masks, torch.from_numpy(maps).to(torch.bfloat16).float().numpy())
    )
    labels, scores = [0, 1, 1, 0], [0.1, 0.8, 0.3, 0.35]
    assert image_metrics(torch.tensor(labels), torch.tensor(scores)) == image_metrics(labels, scores)


def test_maps_of_different_sizes_in_a_list():
    rng = np.random.default_rng(8)
    masks = [random_masks(rng, 1, 10, 14)[0], random_masks(rng, 1, 17, 9)[0]]
    maps = [random_maps(rng, m, 2) for m in masks]
    flat_m = np.concatenate([m.ravel() for m in masks])
    flat_s = np.concatenate([s.ravel() for s in maps])
    got, want = pixel_metrics(masks, maps), sk_metrics(flat_m, flat_s)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    assert got["aupro"] == pytest.approx(slow_aupro(masks, maps), abs=1e-3)


# ----------------------------------------------------------------------------------------------------------
# AUPRO against the slow reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_slow_reference(seed):
    rng = np.random.default_rng(100 + seed)
    masks = random_masks(rng, int(rng.integers(2, 6)), 14, 16)
    maps = random_maps(rng, masks, int(rng.integers(1, 3)))
    for max_fpr in (0.3, 0.05, 1.0):
        assert aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(
            slow_aupro(masks, maps, max_fpr), abs=1e-3
        )
    assert pixel_metrics(masks, maps)["aupro"] == pytest.approx(slow_aupro(masks, maps), abs=1e-3)


def test_aupro_continuous_scores_matches_slow_reference():
    rng = np.random.default_rng(11)
    masks = random_masks(rng, 3, 10, 10)
    maps = (rng.random(masks.shape) + 0.3 * masks).astype(np.float32)  # (almost) no ties
    assert aupro(masks, maps) == pytest.approx(slow_aupro(masks, maps), abs=1e-3)


# ----------------------------------------------------------------------------------------------------------
# hand-checked cases
# ----------------------------------------------------------------------------------------------------------


def test_perfect_and_inverted_maps():
    rng = np.random.default_rng(2)
    masks = random_masks(rng, 4, 12, 12)
    perfect = np.where(masks, 1.0, 0.0).astype(np.float32) + 0.01 * rng.random(masks.shape).astype(np.float32)
    assert pixel_metrics(masks, perfect) == {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0, "aupro": 1.0}
    inverted = pixel_metrics(masks, -perfect)
    assert inverted["auroc"] == 0.0
    assert inverted["aupro"] == 0.0  # no region pixel passes before every normal pixel has
    assert image_metrics([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0}
    assert image_metrics([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1])["auroc"] == 0.0


def test_hand_worked_case():
    # One 1x6 image. Mask 1 1 0 0 0 1: region A = pixels 0-1 (size 2), region B = pixel 5 (size 1); 3 normal.
    # Scores descending: 0.9 A | 0.6 normal and B (tie) | 0.5 A | 0.3 normal | 0.2 normal.
    # (FPR, PRO) per threshold: 0.9 -> (0, 0.25); 0.6 -> (1/3, 0.75); 0.5 -> (1/3, 1); 0.3 -> (2/3, 1);
    # 0.2 -> (1, 1).
    # To FPR 0.3 the curve is the tie segment (0, 0.25)-(1/3, 0.75): y(0.3) = 0.25 + 0.5 * 0.9 = 0.7, area
    # 0.3 * (0.25 + 0.7) / 2 = 0.1425, AUPRO = 0.1425 / 0.3 = 0.475.
    # To FPR 1: (1/3) * (0.25 + 0.75) / 2 + (2/3) * 1 = 1/6 + 2/3 = 0.8333...
    # AUROC: 0.9 beats 3 normals, 0.6 beats 2 and ties 1, 0.5 beats 2 -> 7.5 / 9.
    # AP: thresholds 0.9 (R 1/3, P 1), 0.6 (R 2/3, P 2/3), 0.5 (R 1, P 3/4) -> (1 + 2/3 + 3/4) / 3.
    # F1 = 2TP/(TP+FP+3): 0.9 -> 2/4, 0.6 -> 4/6, 0.5 -> 6/7 (TP 3, FP 1), then lower -> 6/7.
    mask = np.array([[1, 1, 0, 0, 0, 1]])
    score = np.array([[0.9, 0.5, 0.6, 0.3, 0.2, 0.6]], dtype=np.float32)
    got = pixel_metrics([mask], [score])
    assert got["aupro"] == pytest.approx(0.475, abs=1e-12)
    assert aupro([mask], [score], max_fpr=1.0) == pytest.approx(5 / 6, abs=1e-12)
    assert got["auroc"] == pytest.approx(7.5 / 9, abs=1e-12)
    assert got["ap"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3, abs=1e-12)
    assert got["f1_max"] == pytest.approx(6 / 7, abs=1e-12)


def test_diagonal_neighbours_form_one_region():
    # Regions with 8-connectivity: {(0,0), (1,1)} and {(2,3)}; 4-connectivity would give three regions.
    # Only (0,0) scores above the 9 normal pixels (all 0.5): PRO = (1/2 + 0) / 2 = 0.25 until FPR jumps to 1,
    # so AUPRO = 0.25 (three regions would give 1/3).
    mask = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=bool)
    score = np.full(mask.shape, 0.5, dtype=np.float32)
    score[0, 0], score[1, 1], score[2, 3] = 0.9, 0.1, 0.1
    assert aupro(mask[None], score[None]) == pytest.approx(0.25, abs=1e-12)


def test_regions_of_different_images_are_counted_apart():
    # Image 0: a 1-pixel region scored below every normal pixel (missed). Image 1: a 2-pixel region at the
    # same place, scored above them (found). Two regions, one fully found before any false positive:
    # PRO = 0.5 up to FPR 1, so AUPRO = 0.5. (Region ids not kept apart per image would weigh image 1's
    # pixels by the size of image 0's region and reach 1.0.)
    m = np.zeros((2, 3, 3), dtype=bool)
    m[:, 1, 1] = True
    m[1, 1, 2] = True
    s = np.full(m.shape, 0.5, dtype=np.float32)
    s[0, 1, 1] = 0.0
    s[1, 1, 1] = s[1, 1, 2] = 0.9
    assert aupro(m, s) == pytest.approx(0.5, abs=1e-12)
    assert aupro(m, s) == pytest.approx(slow_aupro(m, s), abs=1e-12)


# ----------------------------------------------------------------------------------------------------------
# degenerate input
# ----------------------------------------------------------------------------------------------------------

_M = np.zeros((2, 4, 4), dtype=bool)
_M[0, 1, 1] = True
_S = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)


def _with(arr, idx, value):
    arr = arr.copy()
    arr[idx] = value
    return arr


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: image_metrics([0, 0, 0], [0.1, 0.2, 0.3]), r"all 3 labels are normal"),
        (lambda: image_metrics([1, 1], [0.1, 0.2]), r"all 2 labels are anomalous"),
        (lambda: image_metrics([0, 1], [0.1, float("nan")]), r"1 NaN and 0 inf .*index 1"),
        (lambda: image_metrics([0, 1, 1], [0.1, float("inf"), -float("inf")]), r"0 NaN and 2 inf"),
        (lambda: image_metrics([0, 1, 1], [0.1, 0.2]), r"got 3 labels but 2 scores"),
        (lambda: image_metrics(np.zeros((2, 2)), np.zeros(4)), r"shape \(2, 2\).*shape \(4,\)"),
        (lambda: image_metrics([], []), r"empty input"),
        (lambda: image_metrics([0, 1], ["a", "b"]), r"must be numeric"),
        (lambda: pixel_metrics(np.zeros_like(_M), _S), r"no anomalous pixel in any of the 2 masks"),
        (lambda: pixel_metrics(np.ones_like(_M), _S), r"every pixel of the 2 masks is anomalous"),
        (
            lambda: pixel_metrics(_M, _with(_with(_S, (1, 0, 0), np.nan), (1, 2, 2), np.inf)),
            r"1 NaN and 1 inf values in 1 of 2 maps, first in map 1",
        ),
        (lambda: pixel_metrics(_M, _S[:, :3]), r"mask 0 has shape \(4, 4\) but map 0 has shape \(3, 4\)"),
        (lambda: pixel_metrics(_M, _S[:1]), r"got 2 masks but 1 maps"),
        (lambda: pixel_metrics([], []), r"no mask given"),
        (lambda: pixel_metrics(_M[0], _S[0]), r"\(N, H, W\).*shape \(4, 4\)"),
        (lambda: pixel_metrics(_M, _S, max_fpr=0.0), r"max_fpr must be in \(0, 1\]"),
        (lambda: aupro(_M, _S, max_fpr=1.5), r"max_fpr must be in \(0, 1\]"),
    ],
)
def test_degenerate_input_raises(call, message):
    with pytest.raises(MetricError, match=message):
        call()


def test_errors_are_one_line():
    with pytest.raises(MetricError) as info:
        pixel_metrics(_M, _with(_S, (0, 0, 0), np.nan))
    assert "\n" not in str(info.value)


def test_pixel_scorer_equals_pixel_metrics_for_many_maps():
    from clipfusion.metrics import PixelScorer

    rng = np.random.default_rng(7)
    masks = np.zeros((6, 24, 24), dtype=bool)
    masks[1, 3:9, 4:10] = True
    masks[1, 15:20, 15:22] = True
    masks[4, 10:14, 2:5] = True
    scorer = PixelScorer(masks, max_fpr=0.2)
    for maps in (
        rng.random((6, 24, 24), dtype=np.float32),
        np.round(rng.random((6, 24, 24)), 2).astype(np.float32),  # many ties
        rng.random((6, 24, 24)),  # float64 that float32 cannot hold: the exact fallback
    ):
        assert scorer(maps) == pixel_metrics(masks, maps, max_fpr=0.2)
    with pytest.raises(MetricError, match="mask 0 has shape"):
        scorer(np.zeros((6, 24, 23)))
    with pytest.raises(MetricError, match="no anomalous pixel"):
        PixelScorer(np.zeros((2, 4, 4), bool))(np.zeros((2, 4, 4)))
