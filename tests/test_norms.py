"""Weight norms (sharp/probes/norms.py, `sharp probe --norms`) against hand computations, a
brute-force enumeration of paths, and the rescaling invariance of ReLU networks."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from sharp.cli import cli
from sharp.models import CifarResNet, ConvNet
from sharp.probes.norms import path_norm_obstacle, weight_norms

# Every norm is a sum of a few hundred squares in float64: it agrees with a float64 reference to
# a few units in the last place, so 1e-12 relative leaves room for summation order only.
RTOL = 1e-12


def _batches(shape, n=4):
    return [(torch.zeros(n, *shape, dtype=torch.float64), torch.zeros(n, dtype=torch.long))]


def test_l2_frobenius_and_distance_of_a_linear_layer_by_hand():
    layer = nn.Linear(2, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.bias.copy_(torch.tensor([5.0, 6.0]))
    init = {"weight": torch.zeros(2, 2), "bias": torch.ones(2)}
    result = weight_norms(layer, _batches((2,)), init=init, init_source="here")
    assert result.l2_norm == pytest.approx(math.sqrt(1 + 4 + 9 + 16 + 25 + 36), rel=RTOL)
    assert result.frobenius_sq_sum == pytest.approx(1 + 4 + 9 + 16, rel=RTOL)  # the bias left out
    assert result.distance_from_init == pytest.approx(math.sqrt(1 + 4 + 9 + 16 + 16 + 25), rel=RTOL)
    assert result.distance_from_init_reason is None and result.init_source == "here"
    assert result.n_params == 6 and result.n_weight_tensors == 1
    # path norm of one affine layer on ones: sum_l (sum_i W_li^2 + b_l^2) = (1 + 4 + 25) + (9 + 16 + 36)
    assert result.path_norm == pytest.approx(91.0, rel=RTOL)


def test_path_norm_of_a_bias_free_two_layer_relu_net_equals_the_sum_over_paths():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False)).double()
    w1, w2 = net[0].weight.detach(), net[2].weight.detach()  # signed: the ReLU must not cut paths
    assert (w1 < 0).any() and (w2 < 0).any()
    brute = sum(
        float(w1[j, i] ** 2 * w2[k, j] ** 2) for i, j, k in itertools.product(range(3), range(4), range(2))
    )
    assert weight_norms(net, _batches((3,))).path_norm == pytest.approx(brute, rel=RTOL)


def test_path_norm_with_biases_counts_the_paths_that_start_at_a_bias():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    w1, b1, w2, b2 = (p.detach() for p in net.parameters())
    from_inputs = sum(
        float(w1[j, i] ** 2 * w2[k, j] ** 2) for i, j, k in itertools.product(range(3), range(4), range(2))
    )
    from_hidden_bias = sum(
        float(b1[j] ** 2 * w2[k, j] ** 2) for j, k in itertools.product(range(4), range(2))
    )
    from_output_bias = float((b2**2).sum())
    expected = from_inputs + from_hidden_bias + from_output_bias
    assert weight_norms(net, _batches((3,))).path_norm == pytest.approx(expected, rel=RTOL)


def test_path_norm_of_a_resnet_without_bn_is_invariant_to_rescaling_a_block():
    """c > 0 times conv1 (weight and bias) and 1/c times conv2's weight leave a ReLU block's function
    and every path product unchanged, but not the l2 norm."""
    torch.manual_seed(5)
    net = CifarResNet(8, in_channels=3, num_classes=4, width=0.25, norm="none").double()
    batches = _batches((3, 8, 8))
    before = weight_norms(net, batches)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = net(x)
    block = net.blocks[1]
    with torch.no_grad():
        block.conv1.weight.mul_(3.0)
        block.conv1.bias.mul_(3.0)
        block.conv2.weight.div_(3.0)
    torch.testing.assert_close(net(x), out, rtol=1e-12, atol=1e-12)  # the same function
    after = weight_norms(net, batches)
    assert before.path_norm is not None and before.path_norm > 0
    assert after.path_norm == pytest.approx(before.path_norm, rel=1e-10)  # deeper sums: more rounding
    assert after.l2_norm > before.l2_norm * 1.01
    assert before.input_shape == [3, 8, 8]


def test_path_norm_is_none_with_the_reason_for_bn_and_max_pooling():
    bn = CifarResNet(8, width=0.25, norm="bn")
    result = weight_norms(bn, _batches((3, 8, 8)))
    assert result.path_norm is None and "normalization" in result.path_norm_reason
    assert "BatchNorm" in result.path_norm_reason and result.l2_norm > 0
    assert "max pooling" in path_norm_obstacle(ConvNet(3, 10, norm="none"))
    assert (
        result.distance_from_init is None and result.distance_from_init_reason == "no initial weights given"
    )


def test_weight_norms_leave_the_model_unchanged_and_refuse_a_mismatched_init():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    result = weight_norms(net, _batches((3,)), init={"0.weight": torch.zeros(4, 3)})
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert result.distance_from_init is None and "0.bias is missing" in result.distance_from_init_reason
    assert result.dtype == "float32" and result.wall_time > 0 and json.dumps(result.to_dict())  # JSON-ready


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_sharp_probe_norms_reads_the_initial_weights_of_the_run(tmp_path):
    common = ["--dataset", "digits", "--model", "mlp", "--norm", "none", "--epochs", "1", "--quiet"]
    kept = invoke("train", *common, "--checkpoint-every", "1", "--out", tmp_path / "kept")
    bare = invoke("train", *common, "--out", tmp_path / "bare")
    assert kept.exit_code == 0 and bare.exit_code == 0, kept.output + bare.output
    for name in ("kept", "bare"):
        result = invoke("probe", tmp_path / name, "--norms", "--probe-set", "64")
        assert result.exit_code == 0, result.output
        assert "l2_norm" in result.output and "path_norm" in result.output

    record = json.loads(next((tmp_path / "kept" / "probes").glob("final.weight-norms.*.json")).read_text())
    final = torch.load(tmp_path / "kept" / "final.pt", weights_only=True)
    start = torch.load(tmp_path / "kept" / "checkpoints" / "epoch-0000.pt", weights_only=True)["model"]
    distance = math.sqrt(sum(float((final[k].double() - start[k].double()).square().sum()) for k in final))
    l2 = math.sqrt(sum(float(v.double().square().sum()) for v in final.values()))
    # the probe loads the model in fp32 and sums in float64, the reference sums the same fp32 tensors
    assert record["distance_from_init"] == pytest.approx(distance, rel=RTOL)
    assert record["l2_norm"] == pytest.approx(l2, rel=RTOL)
    assert record["init_source"].endswith("epoch-0000.pt") and record["probe"] == "weight_norms"
    assert record["path_norm"] > 0 and record["provenance"]["checkpoint"] == "final"

    bare = json.loads(next((tmp_path / "bare" / "probes").glob("final.weight-norms.*.json")).read_text())
    assert (
        bare["distance_from_init"] is None
        and "epoch-0000.pt does not exist" in bare["distance_from_init_reason"]
    )
    assert bare["l2_norm"] > 0
