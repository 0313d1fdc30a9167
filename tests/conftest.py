"""Shared fixtures: tiny data, kept in memory, nothing downloaded; tiny runs on it, and the checks
that compare two of them."""

from __future__ import annotations

import pytest
import torch

from sharp.config import TrainConfig
from sharp.data import load_digits, load_synthetic
from sharp.runtime import TorchFlags
from sharp.train import train_step

DIGITS_MLP = dict(dataset="digits", model="mlp", norm="none")  # the MLP with biases, no norm, on digits
# ... under the squared loss in float64: a smooth loss whose Hessian references and accumulated
# runs agree to rounding
EXACT_DIGITS = dict(DIGITS_MLP, loss="mse", precision="fp64")


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


@pytest.fixture
def digits_config():
    """`digits_config(**settings)`: the TrainConfig of DIGITS_MLP with `settings` added or replaced."""
    return lambda **settings: TrainConfig(**{**DIGITS_MLP, **settings})


@pytest.fixture
def exact_config():
    """`exact_config(**settings)`: the TrainConfig of EXACT_DIGITS with `settings` added or replaced."""
    return lambda **settings: TrainConfig(**{**EXACT_DIGITS, **settings})


def _step_losses(t, count: int) -> list[float]:
    windows = t.train_loader.windows(0, t.cfg.batch_size, t.cfg.micro_batch or t.cfg.batch_size)
    losses = []
    for _ in range(count):
        result = train_step(t, next(windows), t.schedule(0))
        losses.append(float(result.loss_sum) / result.count)
    return losses


@pytest.fixture
def step_losses():
    """`step_losses(t, count)`: the losses of the first `count` optimizer steps of a built run `t`."""
    return _step_losses


@pytest.fixture
def compiled_agrees():
    """`compiled_agrees(eager, compiled, count)`: asserts that a compiled built run (torch.compile, or
    CUDA graphs) takes the eager one's first `count` steps: the same losses and final weights."""
    import torch._dynamo

    def check(eager, compiled, count: int) -> None:
        try:
            a, b = _step_losses(eager, count), _step_losses(compiled, count)
        finally:
            torch._dynamo.reset()
        # the compiler fuses and reorders fp32 arithmetic: agreement to ~1e-6 relative per step,
        # compounded over the steps; 1e-4 leaves room and still catches a wrong kernel
        assert b == pytest.approx(a, rel=1e-4)
        for p, q in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)

    return check
