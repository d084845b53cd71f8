"""The shared map arithmetic: Gaussian smoothing equals scipy's, resizing keeps shapes and bounds."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from clipfusion.maps import gaussian_smooth


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
