"""Device, precision and determinism: the settings that differ between a laptop and a GPU."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sharp.errors import SharpError


def select_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SharpError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def parameter_dtype(precision: str) -> torch.dtype:
    """Weights are fp32 under bf16 autocast; fp64 runs everything in double."""
    return torch.float64 if precision == "fp64" else torch.float32


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA or CPU; a no-op for fp32 and fp64."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class TorchFlags:
    """The process-wide torch settings a run or a probe depends on."""

    deterministic: bool
    deterministic_warn_only: bool
    cudnn_benchmark: bool
    cudnn_deterministic: bool
    tf32_matmul: bool
    tf32_cudnn: bool
    threads: int

    @classmethod
    def current(cls) -> TorchFlags:
        return cls(
            deterministic=torch.are_deterministic_algorithms_enabled(),
            deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cudnn_deterministic=torch.backends.cudnn.deterministic,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
            threads=torch.get_num_threads(),
        )

    def apply(self) -> None:
        """Set every flag that differs from the current state (and only those: switching
        deterministic algorithms imports the compiler, about 1.5 s)."""
        now = TorchFlags.current()
        if (now.deterministic, now.deterministic_warn_only) != (
            self.deterministic,
            self.deterministic_warn_only,
        ):
            torch.use_deterministic_algorithms(self.deterministic, warn_only=self.deterministic_warn_only)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        torch.backends.cuda.matmul.allow_tf32 = self.tf32_matmul
        torch.backends.cudnn.allow_tf32 = self.tf32_cudnn
        if now.threads != self.threads:
            torch.set_num_threads(self.threads)


@contextlib.contextmanager
def torch_settings(
    device: torch.device,
    *,
    deterministic: bool = False,
    tf32: bool = False,
    threads: int | None = None,
) -> Iterator[TorchFlags]:
    """Set the flags one run or probe relies on, and restore the caller's afterwards.

    Deterministic kernels when asked (else cuDNN may pick the fastest on CUDA); TF32 for fp32
    matmuls and convolutions only when asked (probes keep it off: at eps = 5e-4 or a Lanczos
    tolerance of 1e-3 its 10-bit mantissa shows); `threads` CPU threads if given. Yields the
    flags in force.
    """
    previous = TorchFlags.current()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    flags = TorchFlags(
        deterministic=deterministic,
        deterministic_warn_only=False,
        cudnn_benchmark=device.type == "cuda" and not deterministic,
        cudnn_deterministic=deterministic,
        tf32_matmul=tf32,
        tf32_cudnn=tf32,
        threads=threads if threads is not None else previous.threads,
    )
    flags.apply()
    try:
        yield flags
    finally:
        previous.apply()
