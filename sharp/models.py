"""CIFAR ResNets of depth 6n+2 (He et al. 2016, "Deep Residual Learning", Sec. 4.2), with
batch, ghost-batch, group or no normalization; and two small nets for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


class _GhostBatchNorm:
    """Batch norm whose training-mode batch is split into ghost batches of `ghost_batch`.

    Each group of `ghost_batch` consecutive examples is normalized with its own statistics
    (Hoffer et al. 2017); γ, β and the running statistics are shared. The running statistics
    are updated as if each group had passed through in turn, one momentum update per group.
    In eval mode, or when the batch is no larger than a group, it is ordinary batch norm.
    State-dict keys are those of the torch BatchNorm it extends.
    """

    ghost_batch: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # running statistics, or the batch's own when none are kept
            return self._eval_forward(x) if self.running_mean is not None else super().forward(x)
        g = self.ghost_batch
        if g is None or x.shape[0] <= g:
            return super().forward(x)  # type: ignore[misc]
        return self._ghost_forward(x, g)

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
        """All full ghost groups in one normalization, the short last group (if any) in one more."""
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
        _he_init(self)

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
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class MLP(nn.Module):
    """Flatten, two hidden layers of 64 * width units with ReLU, then a linear classifier."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: float = 1.0,
        norm: str = "none",
        ghost_batch: int | None = None,
    ) -> None:
        super().__init__()
        hidden = max(1, round(64 * width))
        layers: list[nn.Module] = [nn.Flatten()]
        for size_in in (in_features, hidden):
            layers.append(nn.Linear(size_in, hidden))
            if norm == "bn":
                layers.append(GhostBatchNorm1d(hidden, ghost_batch))
            elif norm == "group":
                layers.append(nn.GroupNorm(min(GROUP_NORM_GROUPS, hidden), hidden))
            layers.append(nn.ReLU())
        layers.append(nn.Linear(hidden, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _he_init(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    image_size: int = 32,
    width: float = 1.0,
    norm: str = "bn",
    bn_batch: int | None = None,
) -> nn.Module:
    """A model by name: `resnet8` ... `resnet110`, `convnet` or `mlp`."""
    if name in RESNET_DEPTHS:
        return CifarResNet(RESNET_DEPTHS[name], in_channels, num_classes, width, norm, bn_batch)
    if name == "convnet":
        return ConvNet(in_channels, num_classes, width, norm, bn_batch)
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes, width, norm, bn_batch)
    raise SharpError(
        f"--model {name!r} is unknown: choose one of {', '.join([*RESNET_DEPTHS, 'convnet', 'mlp'])}"
    )


def is_conv_net(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())
