"""The networks: CIFAR ResNets of depth 6n+2 (He et al. 2016, "Deep Residual Learning", Sec. 4.2)
with batch, ghost-batch, group or no normalization; Keskar et al.'s C1 and C2 (2017, "On
Large-Batch Training for Deep Learning", Table 1) as their published Keras code builds them;
Cohen et al.'s fully-connected nets (2021, "Gradient Descent on Neural Networks Typically Occurs
at the Edge of Stability"); and two small nets for tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sharp.config import check_choice
from sharp.errors import SharpError

RESNET_DEPTHS = {
    "resnet8": 8,
    "resnet20": 20,
    "resnet32": 32,
    "resnet44": 44,
    "resnet56": 56,
    "resnet110": 110,
}
GROUP_NORM_GROUPS = 8
KESKAR_NETS = ("keskar-c1", "keskar-c2")
FC_NETS = ("fc-tanh", "fc-relu")
MODEL_NAMES = (*RESNET_DEPTHS, "mlp", "convnet", *KESKAR_NETS, *FC_NETS)
INITS = ("he", "glorot", "torch")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
# Keras 1's BatchNormalization epsilon from 1.0.8 (Aug. 2016, the release current when the
# authors published their code) through 1.1.x; 1.0.0-1.0.7 had 1e-6
KERAS_BN_EPS = 1e-5
GHOST_BN_IMPLEMENTATIONS = ("auto", "loop", "batched")
MakeBN = Callable[[int, bool], nn.Module]  # (features, spatial) -> a BN layer


class _GhostBatchNorm:
    """Batch norm whose training-mode batch is split into ghost batches of `ghost_batch`.

    Each group of `ghost_batch` consecutive examples is normalized with its own statistics
    (Hoffer et al. 2017); γ, β and the running statistics are shared. The running statistics
    are updated as if each group had passed through in turn, one momentum update per group.
    In eval mode, or when the batch is no larger than a group, it is ordinary batch norm.
    State-dict keys are those of the torch BatchNorm it extends.

    Two implementations give the same numbers (tests/test_ghost_bn.py compares both with torch's
    batch norm group by group in float64): "loop", torch's batch norm on each group in turn
    (the kernel updates the running statistics group by group), and "batched", all full groups
    in one fused group-norm call. `implementation = "auto"` (the default) picks by device: the
    loop on the CPU, where `python -m bench --only ghost_bn` (forward + backward of one layer,
    128 x 16 x 32 x 32 channels_last) measured it 2-5x faster than the batched call at ghost
    sizes 4-16 on the project's quiet 2-core CPU, and 9.8 / 13.8 / 13.7 ms against 28.8 / 26.6 /
    26.0 ms at g = 4 / 8 / 16 with one thread on a loaded one (with two threads under load the
    loop's many small kernels wait on each other and the two came out even); the batched call
    on accelerators, where it launches one kernel instead of ~2n/g, and under torch.compile,
    where the loop would be unrolled into a graph specialised on the batch size.
    """

    ghost_batch: int | None = None
    implementation: str = "auto"  # "auto" (by device, above), "loop" or "batched"
    synchronized: bool = False  # --sync-bn: statistics over every rank's batch (see _synchronized_forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # running statistics, or the batch's own when none are kept
            return self._eval_forward(x) if self.running_mean is not None else super().forward(x)
        if self.synchronized and torch.distributed.is_initialized():
            return self._synchronized_forward(x)
        g = self.ghost_batch
        if g is None or x.shape[0] <= g:
            return super().forward(x)  # type: ignore[misc]
        if self._ghost_implementation(x, g) == "loop":
            return self._loop_forward(x, g)
        return self._ghost_forward(x, g)

    def _ghost_implementation(self, x: torch.Tensor, g: int) -> str:
        """The implementation this input takes (see the class docstring)."""
        check_choice(self.implementation, "ghost BN implementation", GHOST_BN_IMPLEMENTATIONS)
        if g * x[0, 0].numel() == 1:  # one value per channel and group: torch's batch norm refuses it
            return "batched"
        if self.implementation != "auto":
            return self.implementation
        return "loop" if x.device.type == "cpu" and not torch.compiler.is_compiling() else "batched"

    def _loop_forward(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """torch's batch norm on each group of g examples in turn, each updating the running
        statistics in the kernel; a short last group of a single value per channel (torch's
        kernel would make its unbiased variance 0/0) goes through `_normalize_groups`."""
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        chunks = list(x.to(work).split(g))
        lone = chunks[-1][0, 0].numel() * len(chunks[-1]) == 1
        outputs = [
            F.batch_norm(
                chunk,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                training=True,
                momentum=self.momentum,
                eps=self.eps,
            )
            for chunk in (chunks[:-1] if lone else chunks)
        ]
        if self.track_running_stats:
            self.num_batches_tracked.add_(len(outputs))
        if lone:
            y, mean, var = self._normalize_groups(chunks[-1], 1)
            outputs.append(y)
            if self.track_running_stats:
                self._update_running_stats(mean, var)
        y = torch.cat(outputs).to(x.dtype)
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode as the affine map it is, x * scale + shift, with scale = γ / sqrt(var + eps)
        and shift = β - mean * scale: the same function (and gradient in γ, β) as F.batch_norm,
        whose double backward costs a quarter of a Hessian-vector product on a BN ResNet."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(self.running_var + self.eps)
        shift = -self.running_mean * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)

    def _ghost_forward(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """The batched implementation: all full ghost groups in one normalization, the short last
        group (if any) in one more."""
        n = x.shape[0]
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        xw = x.to(work)
        full = (n // g) * g
        # split, not sliced: a slice's backward would write the gradient into a fresh contiguous
        # (not channels_last) tensor
        parts = xw.split([full, n - full]) if full < n else (xw,)
        pieces = [self._normalize_groups(part, min(g, len(part))) for part in parts]
        y = torch.cat([p[0] for p in pieces]) if len(pieces) > 1 else pieces[0][0]
        y = y.to(x.dtype)
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        y = y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if self.track_running_stats:
            self._update_running_stats(torch.cat([p[1] for p in pieces]), torch.cat([p[2] for p in pieces]))
        return y

    def _normalize_groups(self, x: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch norm of each group of g consecutive examples of x (len(x) a multiple of g), as one
        group norm: the g examples of a group stacked along the first spatial axis form one tall
        example, whose channels are the norm's groups (a view when x is channels_last). torch's
        fused kernel also returns each group's mean and 1/std, which F.group_norm discards.
        Returns the output, and the groups' means and unbiased variances, (n // g, C) each."""
        n, channels = x.shape[0], x.shape[1]
        last = x.movedim(1, -1)  # (n, *spatial, C)
        tall = (
            last.reshape(n // g, g * last.shape[1], *last.shape[2:])
            if x.dim() > 2
            else last.reshape(n // g, g, -1)
        )
        tall = tall.movedim(-1, 1)  # (n // g, C, g * H, W), or (n // g, C, g) for (n, C) input
        per_group = tall[0, 0].numel()
        out, mean, rstd = torch.native_group_norm(
            tall, self.weight, self.bias, n // g, channels, per_group, channels, self.eps
        )
        y = out.movedim(1, -1).reshape(last.shape).movedim(-1, 1)
        var = (rstd.detach().pow(-2) - self.eps).clamp(min=0)  # biased, as the kernel had it
        unbiased = var * (per_group / max(per_group - 1, 1))
        return y, mean.detach(), unbiased

    def _synchronized_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch norm over the union of every rank's batch: the per-channel sum is all-reduced
        for the mean, then the sum of squared deviations for the variance (two passes, no
        E[x²] − E[x]² cancellation), both through `torch.distributed.nn`'s differentiable
        all-reduce, so each rank's gradient includes what its examples do to the others'
        statistics. torch's SyncBatchNorm is not used: it runs on GPUs only. A rank with an
        empty share still takes part (its sums are zero)."""
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        xw = x.to(work)
        count = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=work, device=x.device)
        total = all_reduce(torch.cat([xw.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = xw - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / n  # biased, as BN normalizes
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            unbiased = var.detach() * (n / (n - 1).clamp(min=1))
            self._update_running_stats(mean.detach()[None], unbiased[None])
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, means: torch.Tensor, variances: torch.Tensor) -> None:
        """Apply r <- (1 - m) r + m s_k for the groups k = 1..K in order, in closed form."""
        m = self.momentum
        k = means.shape[0]
        weights = m * (1 - m) ** torch.arange(k - 1, -1, -1, dtype=means.dtype, device=means.device)
        decay = (1 - m) ** k
        self.running_mean.mul_(decay).add_((weights[:, None] * means).sum(0).to(self.running_mean.dtype))
        self.running_var.mul_(decay).add_((weights[:, None] * variances).sum(0).to(self.running_var.dtype))
        self.num_batches_tracked.add_(k)


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    def __init__(self, num_features: int, ghost_batch: int | None = None, **kw) -> None:
        super().__init__(num_features, **kw)
        self.ghost_batch = ghost_batch


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    def __init__(self, num_features: int, ghost_batch: int | None = None, **kw) -> None:
        super().__init__(num_features, **kw)
        self.ghost_batch = ghost_batch


def synchronize_bn(model: nn.Module) -> None:
    """Make every BN layer normalize over all ranks' batches together in training (--sync-bn)."""
    for module in model.modules():
        if isinstance(module, _GhostBatchNorm):
            module.synchronized = True


def set_bn_batch(model: nn.Module, ghost_batch: int | None) -> None:
    """Set the ghost-batch size of every ghost BN layer (None: ordinary batch norm)."""
    for module in model.modules():
        if isinstance(module, _GhostBatchNorm):
            module.ghost_batch = ghost_batch


def _norm2d(norm: str, channels: int, ghost_batch: int | None) -> nn.Module:
    if norm == "bn":
        return GhostBatchNorm2d(channels, ghost_batch)
    if norm == "group":
        return nn.GroupNorm(min(GROUP_NORM_GROUPS, channels), channels)
    return nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convs and an identity shortcut; at a stride the shortcut subsamples and pads
    the new channels with zeros (He et al.'s option A: no parameters)."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm: str, ghost_batch: int | None):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=bias)
        self.norm1 = _norm2d(norm, channels, ghost_batch)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=bias)
        self.norm2 = _norm2d(norm, channels, ghost_batch)
        self.stride = stride
        self.pad_channels = channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad_channels))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: depth 6n+2, stages of 16/32/64 channels (times `width`).

    With `norm="none"` it is the ResNet of Masters & Luschi 2018 without BN. It stays
    trainable because convs carry biases (zero at start) and use He initialization,
    N(0, 2 / fan_in), which keeps the residual branches' activations at the scale of their
    inputs; each block then adds its branch to the identity, so the variance grows by about
    2x per block: harmless at depth 8 (3 blocks), and the reason deep nets without BN need the
    small batches and learning rates that Masters & Luschi found.
    """

    def __init__(
        self,
        depth: int,
        in_channels: int = 3,
        num_classes: int = 10,
        width: float = 1.0,
        norm: str = "bn",
        ghost_batch: int | None = None,
        init: str = "he",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise SharpError(f"a CIFAR ResNet has depth 6n+2 (8, 20, 32, ...), not {depth}")
        blocks = (depth - 2) // 6
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=norm == "none")
        self.stem_norm = _norm2d(norm, widths[0], ghost_batch)
        layers, current = [], widths[0]
        for stage, channels in enumerate(widths):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(current, channels, stride, norm, ghost_batch))
                current = channels
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(current, num_classes)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.stem_norm(self.stem(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class ConvNet(nn.Module):
    """A two-layer conv net for fast tests (and Hessian references)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: float = 1.0,
        norm: str = "bn",
        ghost_batch: int | None = None,
        init: str = "he",
    ) -> None:
        super().__init__()
        c1, c2 = max(1, round(8 * width)), max(1, round(16 * width))
        bias = norm == "none"
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, 1, 1, bias=bias),
            _norm2d(norm, c1, ghost_batch),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, 1, 1, bias=bias),
            _norm2d(norm, c2, ghost_batch),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(c2, num_classes)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class MLP(nn.Module):
    """Flatten, two hidden layers of `hidden` * width units, each Linear -> [norm] -> activation,
    then a linear classifier; biases everywhere. With hidden=200 and no norm it is Cohen et al.'s
    `fc-tanh` / `fc-relu` (their archs.py `fully_connected_net`)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: float = 1.0,
        norm: str = "none",
        ghost_batch: int | None = None,
        hidden: int = 64,
        activation: str = "relu",
        init: str = "torch",
    ) -> None:
        super().__init__()
        size = max(1, round(hidden * width))
        layers: list[nn.Module] = [nn.Flatten()]
        for size_in in (in_features, size):
            layers.append(nn.Linear(size_in, size))
            if norm == "bn":
                layers.append(GhostBatchNorm1d(size, ghost_batch))
            elif norm == "group":
                layers.append(nn.GroupNorm(min(GROUP_NORM_GROUPS, size), size))
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(size, num_classes))
        self.net = nn.Sequential(*layers)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class KerasSameMaxPool2d(nn.Module):
    """Keras 1's MaxPooling2D(border_mode='same') on the Theano backend, which Keskar et al. ran:
    pad p = k - 2 (odd k) or k - 1 (even k) on every side, pool, keep the first ceil(n / s)
    rows and columns. For 3x3 stride 2 that is padding 1 (32 -> 16 -> 8); for 2x2 stride 2 the
    windows start one pixel early (rows -1..0, 1..2, ...: the last row and column are never
    pooled), unlike TensorFlow's 'same' or torch's MaxPool2d(2). Theano pads with zeros, torch
    with -inf: the same here, where every pool follows a ReLU (inputs >= 0)."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.padding = kernel - 2 if kernel % 2 else kernel - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(x, self.kernel, self.stride, self.padding)
        rows, cols = (math.ceil(n / self.stride) for n in x.shape[-2:])
        return out[..., :rows, :cols]


def _keras_bn(features: int, norm: str, ghost_batch: int | None, spatial: bool) -> nn.Module:
    """Keras 1 BatchNormalization(mode=2): the batch's own statistics in training and evaluation
    alike, no running statistics (biased variance, epsilon KERAS_BN_EPS); per channel after a
    conv (axis=1 in Theano's channels-first order), per unit after a Dense layer."""
    if norm == "none":
        return nn.Identity()
    cls = GhostBatchNorm2d if spatial else GhostBatchNorm1d
    return cls(features, ghost_batch, eps=KERAS_BN_EPS, track_running_stats=False)


def _keras_conv(in_channels: int, channels: int, kernel: int, bn: MakeBN) -> list[nn.Module]:
    """Keras 1 Convolution2D(border_mode='same') with a bias -> BN -> ReLU (odd `kernel`)."""
    return [nn.Conv2d(in_channels, channels, kernel, padding=kernel // 2), bn(channels, True), nn.ReLU()]


def _keras_dense(in_features: int, features: int, bn: MakeBN) -> list[nn.Module]:
    """Keras 1 Dense with a bias -> BN -> ReLU -> Dropout 0.5, as both of Keskar et al.'s nets end."""
    return [nn.Linear(in_features, features), bn(features, False), nn.ReLU(), nn.Dropout(0.5)]


class _KeskarNet(nn.Module):
    """What Keskar et al.'s nets share: `features` (ending in a flatten) then `classifier`, built
    by `_layers` in that order, BN Keras mode 2 (`_keras_bn`), Keras' Glorot initialization by
    default. `width` scales every hidden layer (1: the paper's)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int = 32,
        width: float = 1.0,
        norm: str = "bn",
        ghost_batch: int | None = None,
        init: str = "glorot",
    ) -> None:
        super().__init__()

        def bn(features: int, spatial: bool) -> nn.Module:
            return _keras_bn(features, norm, ghost_batch, spatial=spatial)

        features, classifier = self._layers(in_channels, num_classes, image_size, width, bn)
        self.features = nn.Sequential(*features, nn.Flatten())
        self.classifier = nn.Sequential(*classifier)
        init_weights(self, init)

    def _layers(
        self, in_channels: int, num_classes: int, image_size: int, width: float, bn: MakeBN
    ) -> tuple[list[nn.Module], list[nn.Module]]:
        """The feature layers and the classifier's, built in that order (`bn(features, spatial)`
        makes one BN layer)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class KeskarShallowNet(_KeskarNet):
    """Keskar et al.'s C1 (CIFAR-10) and C3 (CIFAR-100), `shallownet` in their network_zoo.py:

        Conv 64@5x5 same -> BN -> ReLU -> MaxPool 3x3 stride 2 same
        Conv 64@5x5 same -> BN -> ReLU -> MaxPool 3x3 stride 2 same
        Flatten (64 * 8 * 8) -> Dense 384 -> BN -> ReLU -> Dropout 0.5
        -> Dense 192 -> BN -> ReLU -> Dropout 0.5 -> Dense classes (softmax in the loss)

    Every conv and Dense layer has a bias; BN is Keras mode 2 (`_keras_bn`); 1,757,834 trainable
    parameters for 10 classes. `width` scales every hidden layer (1: the paper's). Default
    initialization Keras' (`init="glorot"`): Glorot uniform weights, zero biases.
    """

    def _layers(
        self, in_channels: int, num_classes: int, image_size: int, width: float, bn: MakeBN
    ) -> tuple[list[nn.Module], list[nn.Module]]:
        conv, dense1, dense2 = (max(1, round(c * width)) for c in (64, 384, 192))
        layers: list[nn.Module] = []
        size, current = image_size, in_channels
        for _ in range(2):
            layers += [*_keras_conv(current, conv, 5, bn), KerasSameMaxPool2d(3, 2)]
            size, current = math.ceil(size / 2), conv
        classifier = [
            *_keras_dense(conv * size * size, dense1, bn),
            *_keras_dense(dense1, dense2, bn),
            nn.Linear(dense2, num_classes),
        ]
        return layers, classifier


class KeskarDeepNet(_KeskarNet):
    """Keskar et al.'s C2 (CIFAR-10) and C4 (CIFAR-100), `deepnet` in their network_zoo.py, a
    VGG-16-like net of five stacks of 3x3 'same' convs, each conv -> BN -> ReLU:

        64, 64 | 128, 128 | 256, 256, 256 | 512, 512, 512 | 512, 512, 512
        Dropout 0.3 after the first conv of the first stack, 0.4 after every other conv that is
        not the last of its stack; MaxPool 2x2 stride 2 same after each stack (32 -> 1)
        Flatten -> Dropout 0.5 -> Dense 512 -> BN -> ReLU -> Dropout 0.5 -> Dense classes

    Biases everywhere, BN Keras mode 2 (`_keras_bn`), Keras 1 Theano 'same' pooling
    (`KerasSameMaxPool2d`: at 2 x 2 only the top-left pixel reaches the classifier);
    14,991,946 trainable parameters for 10 classes. `width` scales every hidden layer.
    Default initialization Keras' (`init="glorot"`): Glorot uniform weights, zero biases.
    """

    STACKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))

    def _layers(
        self, in_channels: int, num_classes: int, image_size: int, width: float, bn: MakeBN
    ) -> tuple[list[nn.Module], list[nn.Module]]:
        layers: list[nn.Module] = []
        size, current = image_size, in_channels
        for stack, (channels, convs) in enumerate(self.STACKS):
            channels = max(1, round(channels * width))
            for index in range(convs):
                layers += _keras_conv(current, channels, 3, bn)
                if index < convs - 1:
                    layers.append(nn.Dropout(0.3 if stack == 0 else 0.4))
                current = channels
            layers.append(KerasSameMaxPool2d(2, 2))
            size = math.ceil(size / 2)
        dense = max(1, round(512 * width))
        classifier = [
            nn.Dropout(0.5),
            *_keras_dense(current * size * size, dense, bn),
            nn.Linear(dense, num_classes),
        ]
        return layers, classifier


def init_weights(model: nn.Module, init: str) -> None:
    """Initialize `model` in place, module by module in order:

    - "he": convolutions N(0, 2 / fan_in) (He et al. 2015), zero conv biases; linear layers keep
      torch's default (as the CIFAR ResNets here always had it);
    - "glorot": Keras' default, convolutions and linear layers U(+-sqrt(6 / (fan_in + fan_out)))
      (Glorot & Bengio 2010; fans include the kernel's area, as Keras 1 computed them), zero biases;
    - "torch": torch's own default, left as built (weights kaiming_uniform(a=sqrt(5)), i.e.
      U(+-1/sqrt(fan_in)), biases U(+-1/sqrt(fan_in))).

    Normalization layers keep γ = 1, β = 0.
    """
    check_choice(init, "init", INITS)
    for module in model.modules():
        if init == "he" and isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        elif init == "glorot" and isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight)
        else:
            continue
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def default_init(name: str) -> str:
    """The initialization `build_model(name, ...)` uses when none is given (see `init_weights`):
    Keras' Glorot for Keskar et al.'s nets, torch's default for the fully-connected nets, He
    for the conv nets."""
    if name in KESKAR_NETS:
        return "glorot"
    if name in FC_NETS or name == "mlp":
        return "torch"
    return "he"


def model_norms(name: str) -> tuple[str, ...]:
    """The `--norm` values a model takes: Keskar et al.'s nets have BN (Keras mode 2) or none,
    Cohen et al.'s fully-connected nets none; the others bn, none or group."""
    if name in KESKAR_NETS:
        return ("bn", "none")
    if name in FC_NETS:
        return ("none",)
    return ("bn", "none", "group")


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    image_size: int = 32,
    width: float = 1.0,
    norm: str = "bn",
    bn_batch: int | None = None,
    init: str | None = None,
) -> nn.Module:
    """A model by name (MODEL_NAMES): `resnet8` ... `resnet110`, `convnet`, `mlp`, `keskar-c1`,
    `keskar-c2`, `fc-tanh` or `fc-relu`; `init` one of INITS, None for `default_init(name)`."""
    check_choice(name, "--model", MODEL_NAMES)
    if norm not in model_norms(name):
        raise SharpError(f"--model {name} takes --norm {' or '.join(model_norms(name))}, not --norm {norm}")
    init = init or default_init(name)
    pixels = in_channels * image_size * image_size
    if name in RESNET_DEPTHS:
        return CifarResNet(RESNET_DEPTHS[name], in_channels, num_classes, width, norm, bn_batch, init)
    if name == "convnet":
        return ConvNet(in_channels, num_classes, width, norm, bn_batch, init)
    if name == "mlp":
        return MLP(pixels, num_classes, width, norm, bn_batch, init=init)
    if name == "keskar-c1":
        return KeskarShallowNet(in_channels, num_classes, image_size, width, norm, bn_batch, init)
    if name == "keskar-c2":
        return KeskarDeepNet(in_channels, num_classes, image_size, width, norm, bn_batch, init)
    activation = name.removeprefix("fc-")
    return MLP(pixels, num_classes, width, norm, bn_batch, hidden=200, activation=activation, init=init)


def is_conv_net(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())
