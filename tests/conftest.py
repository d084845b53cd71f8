"""Shared fixtures. Nothing in the suite may reach the network: the hub is switched off here."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic MVTec-layout data set (all synthetic categories), generated once per session."""
    from clipfusion.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(root, n_train=8, n_test=12, image_size=128, seed=0)
