"""CUDA smoke tests (`pytest -m cuda`; bench/gpu_check.sh runs them): bf16 autocast, channels_last,
torch.compile, CUDA graphs, fused optimizers, TF32 flags, NCCL with one rank, ghost BN's batched
path, and a short run on the GPU against the same run on the CPU in float64. Every test marked
`cuda` skips where torch sees no GPU (tests/conftest.py); the checks of `--cuda-graphs`' settings
run everywhere."""

from __future__ import annotations

import copy
import json
import socket

import pytest
import torch

from sharp.config import TrainConfig
from sharp.errors import SharpError
from sharp.models import GhostBatchNorm2d
from sharp.probes.hessian import hessian_top_eigenvalues
from sharp.runtime import TorchFlags
from sharp.train import build, compile_options, train, train_step

CUDA = torch.device("cuda")
COMMON = dict(dataset="digits", model="convnet", width=0.5, lr=0.05, momentum=0.9, augment=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- --cuda-graphs: its settings, checked on any machine -------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(device="cpu"), "needs a CUDA device"),
        (dict(drop_last=False), "add --drop-last"),
        (dict(precision="fp64"), "--precision fp64"),
        (dict(micro_batch=16), "one micro-batch per step"),
        (dict(batch_size=1024), "one micro-batch per step"),  # the default micro-batch is 512
        (dict(sam_rho=0.05, sam_m=8), "no --sam-m"),
    ],
)
def test_cuda_graphs_refuse_what_they_cannot_replay(changes, message):
    cfg = TrainConfig(**{**COMMON, "batch_size": 32, "drop_last": True, "cuda_graphs": True, **changes})
    with pytest.raises(SharpError, match=message) as info:
        cfg.validate()
    assert "\n" not in str(info.value)


def test_cuda_graphs_compile_for_fixed_shapes_and_need_a_cuda_device(digits, monkeypatch):
    cfg = TrainConfig(**COMMON, batch_size=32, drop_last=True, cuda_graphs=True)
    cfg.validate()
    assert compile_options(cfg) == {"mode": "reduce-overhead", "dynamic": False}
    assert compile_options(TrainConfig(**COMMON, compile=True)) == {"dynamic": True}
    assert compile_options(TrainConfig(**COMMON)) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device auto resolves to the CPU
    with pytest.raises(SharpError, match="needs a CUDA device, and this run's device is cpu"):
        build(cfg, dataset=digits)


# --- on the GPU ----------------------------------------------------------------------------------


@pytest.mark.cuda
def test_bf16_autocast_training_computes_in_bf16_and_tracks_fp32(digits, step_losses):
    fp32 = build(TrainConfig(**COMMON, batch_size=64, device="cuda"), dataset=digits)
    bf16 = build(TrainConfig(**COMMON, batch_size=64, device="cuda", precision="bf16"), dataset=digits)
    seen = []
    bf16.model.fc.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    reference, ours = step_losses(fp32, 5), step_losses(bf16, 5)
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in bf16.model.parameters())
    # bf16 rounds to 8 significant bits (2^-9 relative per operation): a few percent over 5 steps
    assert ours == pytest.approx(reference, rel=3e-2)


@pytest.mark.cuda
def test_channels_last_on_the_gpu_trains_as_the_default_layout(digits, step_losses):
    last = build(TrainConfig(**COMMON, batch_size=64, device="cuda", channels_last=True), dataset=digits)
    plain = build(TrainConfig(**COMMON, batch_size=64, device="cuda", channels_last=False), dataset=digits)
    conv = next(m for m in last.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(iter(last.test.batches(16)))
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    # the same fp32 arithmetic in another order (cuDNN picks other kernels): ~1e-6 per step
    assert step_losses(last, 4) == pytest.approx(step_losses(plain, 4), rel=1e-4)


@pytest.mark.cuda
def test_compiled_run_on_the_gpu_agrees_with_eager(digits, compiled_agrees):
    eager = build(TrainConfig(**COMMON, batch_size=64, micro_batch=32, device="cuda"), dataset=digits)
    compiled = build(
        TrainConfig(**COMMON, batch_size=64, micro_batch=32, device="cuda", compile=True), dataset=digits
    )
    compiled_agrees(eager, compiled, 4)


@pytest.mark.cuda
def test_cuda_graphs_run_agrees_with_eager(digits, compiled_agrees):
    common = dict(**COMMON, batch_size=64, micro_batch=64, drop_last=True, device="cuda")
    eager = build(TrainConfig(**common), dataset=digits)
    graphs = build(TrainConfig(**common, cuda_graphs=True), dataset=digits)
    compiled_agrees(eager, graphs, 6)  # compiled fp32 arithmetic, replayed


@pytest.mark.cuda
@pytest.mark.parametrize(("optimizer", "kernel"), [("sgd", "_fused_sgd"), ("adam", "_fused_adam")])
def test_the_optimizer_on_the_gpu_really_is_fused(digits, optimizer, kernel):
    from torch.profiler import ProfilerActivity, profile

    t = build(
        TrainConfig(**{**COMMON, "lr": 1e-3}, batch_size=32, optimizer=optimizer, device="cuda"),
        dataset=digits,
    )
    assert t.optimizer.defaults["fused"] is True
    windows = t.train_loader.windows(0, 32, 32)
    train_step(t, next(windows), 1e-3)  # the optimizer's state exists from here on
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(t, next(windows), 1e-3)
        torch.cuda.synchronize()
    names = {event.key for event in prof.key_averages()}
    assert any(kernel in name for name in names), sorted(names)


@pytest.mark.cuda
def test_tf32_is_on_during_a_tf32_run_and_the_callers_flags_come_back(digits, tmp_path):
    before = TorchFlags.current()
    seen = []
    cfg = TrainConfig(**COMMON, batch_size=64, steps=2, device="cuda", tf32=True, eval_every=1.0)
    t_hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32)
    )
    try:
        train(cfg, tmp_path / "run", dataset=digits, progress_bar=False)
    finally:
        t_hook.remove()
    assert seen and all(seen)
    assert TorchFlags.current() == before
    flags = json.loads((tmp_path / "run" / "config.json").read_text())["derived"]["torch_flags"]
    assert flags["tf32_matmul"] is True and flags["tf32_cudnn"] is True


@pytest.mark.cuda
def test_nccl_with_one_rank_all_reduces_and_synchronizes_bn():
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        x = torch.arange(4.0, device=CUDA)
        dist.all_reduce(x)
        assert torch.equal(x.cpu(), torch.arange(4.0))  # one rank: the sum is itself, exactly
        layer = GhostBatchNorm2d(3).to(CUDA).double()
        layer.synchronized = True  # --sync-bn: statistics through NCCL's differentiable all-reduce
        plain = copy.deepcopy(layer)
        plain.synchronized = False
        gen = torch.Generator().manual_seed(0)
        inputs = torch.randn(8, 3, 4, 4, generator=gen, dtype=torch.float64).to(CUDA)
        grad_out = torch.randn(inputs.shape, generator=gen, dtype=torch.float64).to(CUDA)
        outs = []
        for m in (layer, plain):
            xi = inputs.clone().requires_grad_(True)
            y = m(xi)
            outs.append((y, *torch.autograd.grad(y, (xi, m.weight), grad_out)))
        # float64; the two differ in the order of the sums only
        for a, b in zip(*outs, strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
        assert torch.allclose(layer.running_var, plain.running_var, rtol=1e-12)
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
def test_ghost_bn_batched_on_the_gpu_equals_the_loop_on_the_cpu():
    gen = torch.Generator().manual_seed(0)
    x = (3 + 2 * torch.randn(4 * 8 + 3, 5, 3, 3, generator=gen, dtype=torch.float64)).contiguous(
        memory_format=torch.channels_last
    )
    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        layer = GhostBatchNorm2d(5, ghost_batch=8).double().to(device)
        xi = x.to(device).requires_grad_(True)
        assert layer._ghost_implementation(xi, 8) == ("loop" if device == "cpu" else "batched")
        y = layer(xi)
        grads = torch.autograd.grad(y, (xi, layer.weight, layer.bias), grad_out.to(device))
        results.append([t.cpu() for t in (y, *grads, layer.running_mean, layer.running_var)])
    # float64, the same statistics in another order of summation: rounding only
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
def test_a_short_run_on_the_gpu_equals_the_same_run_on_the_cpu_in_float64(digits, tmp_path):
    """Ghost BN (the loop on the CPU, batched on the GPU), accumulation with a short last
    micro-batch, momentum: the final weights agree to float64 rounding."""
    finals = {}
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(
            **COMMON, batch_size=96, micro_batch=40, bn_batch=8, steps=5, precision="fp64", device=device
        )
        train(cfg, tmp_path / device, dataset=digits, progress_bar=False)
        finals[device] = torch.load(tmp_path / device / "final.pt", map_location="cpu", weights_only=True)
    assert finals["cpu"].keys() == finals["cuda"].keys()
    for name, value in finals["cpu"].items():
        other = finals["cuda"][name]
        if value.is_floating_point():
            # float64 sums in other orders (cuDNN, cuBLAS): ~1e-15 per operation, grown over 5 steps
            assert torch.allclose(value, other, rtol=1e-9, atol=1e-11), name
        else:
            assert torch.equal(value, other), name


@pytest.mark.cuda
def test_hessian_eigenvalues_on_the_gpu_equal_the_cpus_in_float64(digits):
    from sharp.models import build_model

    torch.manual_seed(0)
    model = build_model("convnet", 1, 10, 8, width=0.5).double().eval()
    x = digits.test_images[:64].double() / 255
    y = digits.test_labels[:64]
    cpu = hessian_top_eigenvalues(model, [(x, y)], k=3, tol=1e-8)
    gpu = hessian_top_eigenvalues(copy.deepcopy(model).to(CUDA), [(x.to(CUDA), y.to(CUDA))], k=3, tol=1e-8)
    # both converged to a 1e-8 relative residual; float64 HVPs differ by rounding only
    assert gpu.eigenvalues == pytest.approx(cpu.eigenvalues, rel=1e-6)
