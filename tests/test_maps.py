"""The shared map arithmetic: Gaussian smoothing equals scipy's, resizing keeps shapes and bounds."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from clipfusion.maps import gaussian_smooth, resize_maps


@pytest.mark.parametrize(("size", "sigma"), [(40, 2.0), (16, 4.0), (7, 4.0)])
def test_gaussian_smooth_matches_scipy(size, sigma):
    rng = np.random.default_rng(0)
    maps = rng.random((2, size, size + 3)).astype(np.float32)
    ours = gaussian_smooth(torch.from_numpy(maps), sigma=sigma).numpy()
    ref = np.stack([ndimage.gaussian_filter(m.astype(np.float64), sigma=sigma) for m in maps])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_sigma_zero_is_identity():
    maps = torch.rand(1, 16, 16)
    assert torch.equal(gaussian_smooth(maps, 0.0), maps)


def test_resize_to_height_and_width_is_bilinear_and_keeps_bounds():
    maps = torch.rand(2, 3, 8, 8)
    out = resize_maps(maps, (12, 20))
    assert out.shape == (2, 3, 12, 20) and out.dtype == torch.float32
    assert out.min() >= maps.min() and out.max() <= maps.max()
    expected = torch.nn.functional.interpolate(maps, size=(12, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(resize_maps(maps, (8, 8)), maps)  # already at the size: unchanged
    torch.testing.assert_close(resize_maps(maps, 16), resize_maps(maps, (16, 16)), rtol=0, atol=0)
