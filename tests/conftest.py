"""Shared fixtures: tiny data, kept in memory, nothing downloaded."""

from __future__ import annotations

import pytest
import torch

from sharp.data import load_digits, load_synthetic
from sharp.runtime import TorchFlags


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits():
    return load_digits()


@pytest.fixture(scope="session")
def synthetic():
    return load_synthetic(256)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _torch_flags_restored():
    """Every test leaves the process-wide torch flags (determinism, cuDNN, TF32, threads) as it
    found them: runs and probes set what they need and restore the caller's settings."""
    before = TorchFlags.current()
    yield
    assert TorchFlags.current() == before
