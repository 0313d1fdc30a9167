"""BN statistics in probes: running (eval), recomputed at the probed weights (recompute), and each
BN group's own (batch, groups of bn_batch).

References are independent of `sharp.probes.bn`: after an exact recompute, every BN layer's
normalized output over all the data has mean 0 and a variance fixed by the unbiased estimate
(a property of the result, whatever computed it); statistics of every BN input gathered by
concatenation; batch statistics from a train-mode forward of each group on a copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from sharp.errors import SharpError
from sharp.models import build_model, set_bn_batch
from sharp.probes import hessian_top_eigenvalues
from sharp.probes.bn import recompute_bn_statistics
from sharp.probes.common import ProbeModel
from sharp.probes.hessian import hessian_trace
from sharp.probes.landscape import random_direction_scan
from sharp.probes.noise import gradient_noise_scale
from sharp.probes.sharpness import adaptive_sharpness, average_sharpness, epsilon_sharpness

F64 = torch.float64
BatchNorm = nn.modules.batchnorm._BatchNorm


def batches_of(sizes, shape=(1, 8, 8), classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, *shape, generator=gen, dtype=F64) * 2 + 0.7,
            torch.randint(0, classes, (n,), generator=gen),
        )
        for n in sizes
    ]


def trained_like(name: str, **kw) -> nn.Module:
    """A float64 model with non-trivial BN parameters and stale running statistics."""
    torch.manual_seed(3)
    model = build_model(name, 1, 3, image_size=8, **kw).double()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen, dtype=F64))
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen, dtype=F64) - 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen, dtype=F64))
                m.running_var.copy_(0.3 + torch.rand(m.running_var.shape, generator=gen, dtype=F64))
    return model.eval()


MODELS = {
    "convnet": lambda: trained_like("convnet", width=0.5),
    "resnet8": lambda: trained_like("resnet8", width=0.25),
    "resnet8-ghost": lambda: trained_like("resnet8", width=0.25, bn_batch=2),
    "mlp": lambda: trained_like("mlp", width=0.25, norm="bn"),
}


def normalized_outputs(model, batches):
    """Per BN layer: its input normalized with its running statistics, over all the data, in eval mode."""
    layers = [m for m in model.modules() if isinstance(m, BatchNorm)]
    seen = {id(m): [] for m in layers}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args: seen[id(mod)].append(
                (
                    (args[0] - _expand(mod.running_mean, args[0]))
                    / _expand((mod.running_var + mod.eps).sqrt(), args[0])
                )
                .transpose(0, 1)
                .reshape(mod.num_features, -1)
            )
        )
        for m in layers
    ]
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in handles:
        h.remove()
    return [(m, torch.cat(seen[id(m)], dim=1)) for m in layers]


def _expand(stat, x):
    return stat.view(1, -1, *([1] * (x.dim() - 2)))


@pytest.mark.parametrize("name", list(MODELS))
def test_recompute_gives_exact_statistics_whatever_the_batching(name):
    data = batches_of([5, 9, 3])
    model = MODELS[name]()
    recomputed = copy.deepcopy(model)
    info = recompute_bn_statistics(recomputed, data)
    assert info == {"layers": sum(isinstance(m, BatchNorm) for m in model.modules()), "examples": 17}
    for module, z in normalized_outputs(recomputed, data):
        n = z.shape[1]
        var = module.running_var
        # exact statistics: the normalized inputs over all data have mean 0 and biased variance
        # ((n - 1)/n) var / (var + eps); float64 sums of a few thousand values: 1e-12 is rounding
        torch.testing.assert_close(z.mean(1), torch.zeros_like(var), rtol=0, atol=1e-12)
        torch.testing.assert_close(
            z.var(1, unbiased=False), (n - 1) / n * var / (var + module.eps), rtol=1e-12, atol=0
        )
    # the same examples batched otherwise give the same statistics (to rounding)
    again = copy.deepcopy(model)
    recompute_bn_statistics(again, [(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))])
    for a, b in zip(recomputed.modules(), again.modules(), strict=True):
        if isinstance(a, BatchNorm):
            torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=1e-12)
            torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=0)
    # torch's update_bn (train-mode statistics, equal weight per batch) is not this
    swa = copy.deepcopy(model)
    set_bn_batch(swa, None)  # ghost BN's closed-form update needs a numeric momentum; update_bn sets None
    update_bn(data, swa)
    last = [m for m in swa.modules() if isinstance(m, BatchNorm)][-1]
    ours = [m for m in recomputed.modules() if isinstance(m, BatchNorm)][-1]
    assert (last.running_var - ours.running_var).abs().max() > 1e-6
    assert not model.training and all(p.grad is None for p in recomputed.parameters())


def test_recompute_in_a_probe_happens_once_at_the_given_weights():
    data, probe_set = batches_of([6, 7], seed=1), batches_of([4, 4], seed=2)
    model = MODELS["convnet"]()
    pm = ProbeModel(model, probe_set, bn_mode="recompute", bn_data=data)
    ref = copy.deepcopy(model)
    recompute_bn_statistics(ref, data)
    with torch.no_grad():
        expected = sum(F.cross_entropy(ref(x), y) * len(y) for x, y in probe_set) / 8
    assert pm.loss() == pytest.approx(float(expected), rel=1e-13)  # float64 forward: rounding only
    assert pm.bn == {
        "mode": "recompute",
        "layers": 2,
        "recomputed_from_examples": 13,
        "recompute": "exact per-channel mean and unbiased variance, layer by layer in eval mode",
    }
    # the caller's model keeps its own statistics
    assert not torch.equal(model.features[1].running_mean, pm.model.features[1].running_mean)
    # a generator of batches is read once, then reused for every layer
    gen_pm = ProbeModel(model, probe_set, bn_mode="recompute", bn_data=(b for b in data))
    assert gen_pm.loss() == pytest.approx(pm.loss(), rel=1e-15)


def reference_group_loss(model, batches, groups, gradient=False):
    """Mean loss with each consecutive group normalized by its own statistics (train-mode BN on a
    copy that keeps no running statistics, dropout-free nets), weighted by group size; with
    `gradient`, also its flat gradient by autograd."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    ref.train()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    total, start = 0.0, 0
    for size in groups:
        total = total + F.cross_entropy(ref(x[start : start + size]), y[start : start + size]) * size
        start += size
    loss = total / len(y)
    if not gradient:
        return float(loss.detach())
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])


def test_batch_mode_normalizes_groups_of_bn_batch():
    data = batches_of([10, 13])
    model = MODELS["convnet"]()
    pm = ProbeModel(model, data, bn_mode="batch", bn_batch=5)
    assert [len(t) for _, t in pm.batches] == [5, 5, 5, 5, 3]  # consecutive examples; a short last group
    assert pm.bn["groups"] == 5 and pm.bn["last_group"] == 3 and pm.bn["bn_batch"] == 5
    assert pm.loss() == pytest.approx(reference_group_loss(model, data, [5, 5, 5, 5, 3]), rel=1e-13)
    # without bn_batch each given batch is one group
    given = ProbeModel(model, data, bn_mode="batch")
    assert given.loss() == pytest.approx(reference_group_loss(model, data, [10, 13]), rel=1e-13)
    assert given.bn["grouping"] == "each given batch is one BN group"
    # groups of one have no batch statistics
    with pytest.raises(SharpError, match="at least 2"):
        ProbeModel(model, batches_of([11]), bn_mode="batch", bn_batch=5)
    # gradients of chunks in batch mode use the same groups (adaptive sharpness, noise scale)
    loss, grad = pm.batch_gradient((torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])))
    ref_loss, ref_grad = reference_group_loss(model, data, [5, 5, 5, 5, 3], gradient=True)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)  # float64: rounding only


class StatLess(nn.Module):
    """A conv net whose BN keeps no running statistics (Keras BN mode 2, Keskar et al.'s nets)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_bn_without_running_statistics_takes_batch_mode_only():
    torch.manual_seed(0)
    model = StatLess().double()
    data = batches_of([6, 6])
    for mode in ("eval", "recompute"):
        with pytest.raises(SharpError, match="keeps none") as info:
            ProbeModel(model, data, bn_mode=mode, bn_data=data if mode == "recompute" else None)
        assert "\n" not in str(info.value)
    pm = ProbeModel(model, data, bn_mode="batch", bn_batch=4)
    assert pm.loss() == pytest.approx(reference_group_loss(model, data, [4, 4, 4]), rel=1e-13)
    result = hessian_top_eigenvalues(model, data, k=1, bn_mode="batch", bn_batch=4)
    assert result.bn_settings["groups"] == 3 and result.bn_mode == "batch"


def test_bn_arguments_are_checked():
    model, data = MODELS["convnet"](), batches_of([4])
    with pytest.raises(SharpError, match="needs bn_data"):
        ProbeModel(model, data, bn_mode="recompute")
    with pytest.raises(SharpError, match="recompute' only"):
        ProbeModel(model, data, bn_data=data)
    with pytest.raises(SharpError, match="batch' only"):
        ProbeModel(model, data, bn_batch=4)
    with pytest.raises(SharpError, match="unknown"):
        ProbeModel(model, data, bn_mode="train")
    plain = build_model("convnet", 1, 3, norm="none").double()
    assert ProbeModel(plain, data, bn_mode="recompute").bn["layers"] == 0  # nothing to recompute


@pytest.mark.parametrize("mode", ["recompute", "batch"])
def test_every_probe_takes_and_records_the_bn_mode(mode):
    model, data = MODELS["convnet"](), batches_of([8, 8], seed=5)
    kw = {
        "bn_mode": mode,
        **({"bn_data": batches_of([9], seed=6)} if mode == "recompute" else {"bn_batch": 4}),
    }
    reference = ProbeModel(model, data, **kw).loss()
    results = [
        epsilon_sharpness(model, data, maxiter=2, random_starts=0, **kw),
        adaptive_sharpness(model, data, m=8, steps=2, **kw),
        average_sharpness(model, data, n_draws=2, **kw),
        hessian_top_eigenvalues(model, data, k=1, **kw),
        hessian_trace(model, data, maxiter=2, min_samples=2, **kw),
        random_direction_scan(model, data, [0.0], **kw),
        gradient_noise_scale(model, data, 2, 4, n_pairs=2, repeats=2, **kw),
    ]
    for result in results:
        assert result.bn_mode == mode and result.bn_settings["mode"] == mode
    assert results[0].f0 == pytest.approx(reference, rel=1e-13)  # the same statistics as a ProbeModel's
    assert results[5].loss[0] == pytest.approx(reference, rel=1e-13)
