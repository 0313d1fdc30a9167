"""Loss landscapes: the line between two solutions, and random slices around one.

`interpolate` evaluates f(θ(α)) with θ(α) = (1 − α)·θ_a + α·θ_b, the parametric plot of
Keskar et al. 2017 (Fig. 3, "On Large-Batch Training for Deep Learning"): with model_a the
small-batch solution x_s and model_b the large-batch one x_l, θ(α) = α x_l + (1 − α) x_s;
or along their Fig. 7 curve θ(α) = sin(απ/2) x_l + cos(απ/2) x_s (`path="sin"`). BN
running statistics along the path are recomputed on training data at each α (default),
blended (loss-landscape's "states" mode, variances in log space), kept from model_a, or
replaced by batch statistics.

`random_direction_scan` evaluates f(θ + α d₁) or f(θ + α d₁ + β d₂) along Gaussian directions
filter-normalized to the scanned model (Li et al. 2018, "Visualizing the Loss Landscape of
Neural Nets"). Directions are stored as the raw Gaussian draws keyed by parameter name
and are normalized again to each model they scan, as Li et al. do when they compare models:
the same draws give each model directions scaled to its own filters.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from sharp.config import check_choice
from sharp.errors import SharpError
from sharp.fileio import atomic_write_bytes
from sharp.probes.bn import bn_layers, recompute_bn_statistics
from sharp.probes.common import (
    Batch,
    LossFn,
    ProbeModel,
    ProbeResult,
    cross_entropy,
)
from sharp.progress import progress_bar

BN_BUFFER_MODES = ("recompute", "interpolate", "a", "batch")
PATHS = ("line", "sin")
IGNORE_MODES = ("biasbn", "none")
DIRECTIONS_FORMAT = "sharp-directions-1"

Direction = dict[str, torch.Tensor]


# --- alphas ---------------------------------------------------------------------------------


def parse_alphas(text: str) -> list[float]:
    """Parse `start:stop:count` (inclusive, as numpy.linspace) or a comma list `0,0.5,1`.

    Keskar et al. 2017 (Fig. 3) use `-1:2:25`. Grid points within rounding of 0 or 1 are
    set to exactly 0 and 1, so those points are the two models themselves.
    """
    if not isinstance(text, str) or not text.strip():
        raise SharpError("alphas are empty: give start:stop:count (e.g. -1:2:25) or a list like 0,0.5,1")
    text = text.strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, count_text = float(parts[0]), float(parts[1]), parts[2].strip()
            count = int(count_text)
            if count < 2 or str(count) != count_text.lstrip("+"):
                raise ValueError
            values = np.linspace(start, stop, count).tolist()
        else:
            values = [float(part) for part in text.split(",")]
    except ValueError:
        raise SharpError(
            f"alphas {text!r} cannot be read: give start:stop:count with an integer count >= 2 "
            "(e.g. -1:2:25) or a comma list like 0,0.5,1"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise SharpError(f"alphas {text!r} contain a non-finite value: give finite numbers")
    span = max((abs(v) for v in values), default=1.0)
    return [_snap(v, span) for v in values]


def _snap(value: float, span: float) -> float:
    for anchor in (0.0, 1.0):
        if abs(value - anchor) <= 1e-12 * max(span, 1.0):
            return anchor
    return float(value)


def _as_alphas(values: Sequence[float] | str, name: str) -> list[float]:
    if isinstance(values, str):
        return parse_alphas(values)
    out = [float(v) for v in values]
    if not out:
        raise SharpError(f"{name} are empty: give at least one value")
    if not all(math.isfinite(v) for v in out):
        raise SharpError(f"{name} contain a non-finite value: give finite numbers")
    return out


# --- interpolation --------------------------------------------------------------------------


@dataclass(kw_only=True)
class InterpolationResult(ProbeResult):
    """Train/test loss and accuracy along θ(α) between two solutions (Keskar et al. 2017, Fig. 3
    for the line, Fig. 7 for the sine path)."""

    kind: ClassVar[str] = "interpolation"
    alphas: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    path: str = "line"
    bn: str = "recompute"
    distance: float = 0.0  # ‖θ_b − θ_a‖₂ over parameters (buffers excluded)


def path_coefficients(alpha: float, path: str) -> tuple[float, float]:
    """(c_a, c_b) with θ(α) = c_a θ_a + c_b θ_b: (1 − α, α) on the line; (cos(απ/2), sin(απ/2))
    on the sine path. Exactly (1, 0) at α = 0 and (0, 1) at α = 1 on both."""
    if alpha == 0.0:
        return 1.0, 0.0
    if alpha == 1.0:
        return 0.0, 1.0
    if path == "line":
        return 1.0 - alpha, alpha
    return math.cos(alpha * math.pi / 2), math.sin(alpha * math.pi / 2)


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Raise SharpError naming the first state_dict key or shape where the two models differ."""
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    for key, tensor in sd_a.items():
        if key not in sd_b:
            raise SharpError(
                f"the two models differ: {key!r} is in model_a but not in model_b; "
                "interpolate between two models of one architecture"
            )
        if tuple(tensor.shape) != tuple(sd_b[key].shape):
            raise SharpError(
                f"the two models differ at {key!r}: shape {tuple(tensor.shape)} in model_a, "
                f"{tuple(sd_b[key].shape)} in model_b; interpolate between two models of one architecture"
            )
    for key in sd_b:
        if key not in sd_a:
            raise SharpError(
                f"the two models differ: {key!r} is in model_b but not in model_a; "
                "interpolate between two models of one architecture"
            )


BN_BUFFER_TEXT = {
    "recompute": "recomputed at each alpha from bn_data by sharp.probes.bn.recompute_bn_statistics (exact "
    "per-channel mean and unbiased variance over all its examples, layer by layer in eval mode)",
    "interpolate": "running means and other floating buffers blended like the weights, running variances "
    "in log space (a geometric blend, positive at every alpha); integer buffers from model_a",
    "a": "all buffers from model_a",
    "batch": "batch statistics: each BN group of bn_batch consecutive examples normalized by its own",
}


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    train_batches: Iterable[Batch],
    test_batches: Iterable[Batch],
    alphas: Sequence[float] | str,
    bn: str = "recompute",
    loss_fn: LossFn = cross_entropy,
    bn_data: Iterable[Batch] | None = None,
    bn_batch: int | None = None,
    path: str = "line",
    progress: bool = False,
) -> InterpolationResult:
    """Mean train/test loss and accuracy at θ(α) = c_a(α) θ_a + c_b(α) θ_b for each α.

    Keskar et al. 2017 plot f(α x_l + (1 − α) x_s) for α in [−1, 2] (Fig. 3, `path="line"`)
    and f(sin(απ/2) x_l + cos(απ/2) x_s) (Fig. 7, `path="sin"`): pass the small-batch
    solution as model_a (α = 0) and the large-batch one as model_b (α = 1); see
    `path_coefficients`. All parameters are interpolated. BN, by `bn`:
      - "recompute": running statistics recomputed at each α from `bn_data` (default: the
        train batches) by `sharp.probes.bn.recompute_bn_statistics`;
      - "interpolate": running means blended like the weights and running variances in log
        space, var(α) = var_a^{1 − α} var_b^{α} (the line only: a linear blend of variances goes
        negative outside [0, 1], which gave NaN at α = −1 and 2); integer buffers
        (num_batches_tracked) from model_a;
      - "a": all buffers from model_a;
      - "batch": batch statistics, in BN groups of `bn_batch` consecutive examples (the only
        mode for BN layers that keep no running statistics).
    Non-BN floating buffers are blended in "recompute" and "interpolate" modes. Evaluation is
    in eval mode on a working copy in model_a's dtype and device; the caller's models are
    not modified. Losses are exact means over all examples of each probe set.
    """
    check_choice(bn, "bn", BN_BUFFER_MODES)
    check_choice(path, "path", PATHS)
    if path == "sin" and bn == "interpolate":
        raise SharpError("bn 'interpolate' blends statistics along the line only: use bn 'recompute' or 'a'")
    if bn_batch is not None and bn != "batch":
        raise SharpError(f"bn_batch applies to bn 'batch' only, not {bn!r}")
    check_same_architecture(model_a, model_b)
    alpha_list = _as_alphas(alphas, "alphas")

    mode = "batch" if bn == "batch" else "eval"
    train = ProbeModel(model_a, train_batches, loss_fn, bn_mode=mode, bn_batch=bn_batch)
    test = ProbeModel(model_a, test_batches, loss_fn, bn_mode=mode, bn_batch=bn_batch)
    if bn == "recompute":
        # moved to the model's device batch by batch, re-read at each alpha (a generator once, into a list)
        bn_set = train.batches if bn_data is None else list(bn_data) if iter(bn_data) is bn_data else bn_data
    elif bn_data is not None:
        raise SharpError(f"bn_data is used by bn 'recompute' only, not {bn!r}")

    param_names = {name for name, _ in train.model.named_parameters()}
    bn_buffer_names = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in train.model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, _ in module.named_buffers(recurse=False)
    }
    sd_a = {k: v.detach().clone() for k, v in train.model.state_dict().items()}
    state_b = model_b.state_dict()
    sd_b = {k: state_b[k].detach().to(device=v.device, dtype=v.dtype) for k, v in sd_a.items()}

    def blended(key: str) -> bool:
        if key in param_names:
            return True
        if not sd_a[key].is_floating_point() and not sd_a[key].is_complex():
            return False  # integer buffers (num_batches_tracked): model_a's
        if key in bn_buffer_names:
            return bn == "interpolate"  # "recompute" overwrites them anyway
        return bn != "a"

    blend_keys = [k for k in sd_a if blended(k)]
    log_keys = {k for k in blend_keys if k in bn_buffer_names and k.endswith("running_var")}
    log_a = {k: sd_a[k].log() for k in log_keys}
    log_b = {k: sd_b[k].log() for k in log_keys}
    distance = math.sqrt(sum(float((sd_b[k].double() - sd_a[k].double()).pow(2).sum()) for k in param_names))
    norm_a = math.sqrt(sum(float(sd_a[k].double().pow(2).sum()) for k in param_names))
    norm_b = math.sqrt(sum(float(sd_b[k].double().pow(2).sum()) for k in param_names))

    layers = len(bn_layers(train.model))
    bn_updates, bn_examples = 0, None
    out: dict[str, list[float]] = {"train_loss": [], "train_acc": [], "test_loss": [], "test_acc": []}
    for alpha in progress_bar(alpha_list, desc="interpolating", unit="point", enabled=progress):
        c_a, c_b = path_coefficients(alpha, path)
        state = dict(sd_a)
        for key in blend_keys:
            # c_a·a + c_b·b rather than a + α(b − a): exactly a at α=0 and exactly b at α=1.
            if key in log_keys and c_a and c_b:  # at the endpoints the buffers themselves (exp∘log rounds)
                state[key] = (log_a[key] * c_a + log_b[key] * c_b).exp()
            else:
                state[key] = sd_a[key] * c_a + sd_b[key] * c_b
        train.model.load_state_dict(state)
        if bn == "recompute" and layers:
            bn_examples = recompute_bn_statistics(train.model, bn_set)["examples"]
            bn_updates += 1
        test.model.load_state_dict(train.model.state_dict())
        loss, acc = train.loss_and_accuracy()
        out["train_loss"].append(loss)
        out["train_acc"].append(acc)
        loss, acc = test.loss_and_accuracy()
        out["test_loss"].append(loss)
        out["test_acc"].append(acc)

    fields = train.result_fields(
        interpolation={
            "line": "(1 - alpha) * theta_a + alpha * theta_b over all parameters",
            "sin": "cos(alpha pi / 2) * theta_a + sin(alpha pi / 2) * theta_b over all parameters",
        }[path],
        model_a="alpha = 0 (x_s in Keskar et al. 2017)",
        model_b="alpha = 1 (x_l in Keskar et al. 2017)",
        n_test_examples=test.n_examples,
        bn_buffers=BN_BUFFER_TEXT[bn],
        bn_batches=("train" if bn_data is None else "given") if bn == "recompute" else None,
        n_bn_examples=bn_examples,
        bn_batch=bn_batch,
        has_bn=bool(layers),
        norm_a=norm_a,
        norm_b=norm_b,
    )
    fields["bn_settings"]["mode"] = bn
    fields["evaluations"] = {
        "loss": train.counts["loss"] + test.counts["loss"],  # passes over the train or test set
        **({"bn_update": bn_updates} if bn_updates else {}),
    }
    return InterpolationResult(**fields, alphas=alpha_list, path=path, bn=bn, distance=distance, **out)


# --- random directions ----------------------------------------------------------------------


def _draw(model: nn.Module, count: int, seed: int) -> list[Direction]:
    """Raw N(0, 1) draws, one tensor per parameter in parameter order, direction after direction.

    Drawn in float64 on a CPU generator whatever the model, so a seed gives the same
    directions on any device and dtype; every parameter gets a draw (1-D ones included) so
    the stream does not depend on `ignore`.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    named = list(model.named_parameters())
    return [
        {name: torch.randn(p.shape, generator=gen, dtype=torch.float64) for name, p in named}
        for _ in range(count)
    ]


def filter_normalize(
    direction: Mapping[str, torch.Tensor], model: nn.Module, ignore: str = "biasbn"
) -> Direction:
    """Scale `direction` filter by filter to the weights of `model` (Li et al. 2018, Sec. 4).

    For a parameter with ndim > 1, each slice along dim 0 (an output channel or unit) is
    rescaled to the Frobenius norm of the same slice of the weight. Parameters with ndim <= 1
    (biases, BN γ/β) are zeroed with ignore="biasbn", or set to the weight itself with
    ignore="none" (as loss-landscape does). Only each slice's direction is used, so raw
    draws and directions normalized to another model give the same result (to rounding).
    Returned in the model's dtype and on its device.
    """
    check_choice(ignore, "ignore", IGNORE_MODES)
    _check_direction(direction, model)
    out: Direction = {}
    with torch.no_grad():
        for name, w in model.named_parameters():
            w = w.detach()
            d = direction[name].to(device=w.device, dtype=w.dtype)
            if w.dim() <= 1:
                out[name] = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
                continue
            d2, w2 = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
            d_norm = torch.linalg.vector_norm(d2, dim=1)
            w_norm = torch.linalg.vector_norm(w2, dim=1)
            # No epsilon in the denominator (loss-landscape adds 1e-10): a zero slice stays zero.
            scale = torch.where(d_norm > 0, w_norm / torch.where(d_norm > 0, d_norm, 1), 0)
            out[name] = (d2 * scale[:, None]).reshape(w.shape)
    return out


def _check_direction(direction: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for name, shape in shapes.items():
        if name not in direction:
            raise SharpError(
                f"the direction has no tensor for parameter {name!r}: "
                "use directions made for this architecture"
            )
        if tuple(direction[name].shape) != shape:
            raise SharpError(
                f"the direction's {name!r} has shape {tuple(direction[name].shape)}, the model's {shape}: "
                "use directions made for this architecture"
            )
    for name in direction:
        if name not in shapes:
            raise SharpError(
                f"the direction has {name!r}, which is no parameter of the model: "
                "use directions made for this architecture"
            )


def make_directions(
    model: nn.Module, count: int, seed: int, ignore: str = "biasbn", normalize: bool = True
) -> list[Direction]:
    """`count` seeded Gaussian directions keyed by parameter name (Li et al. 2018).

    With normalize=True (default) each is filter-normalized to `model` (see
    `filter_normalize`); with normalize=False they are the raw N(0, 1) draws, which is what
    to save to scan several models on the same directions (each scan normalizes them to
    its own model). Normalized directions are exactly the ones `random_direction_scan`
    uses for the same model, seed and ignore.
    """
    check_choice(ignore, "ignore", IGNORE_MODES)
    if int(count) < 1:
        raise SharpError(f"count {count} is too small: ask for at least 1 direction")
    raw = _draw(model, int(count), seed)
    return [filter_normalize(d, model, ignore) for d in raw] if normalize else raw


def save_directions(
    path: str | Path, directions: Sequence[Mapping[str, torch.Tensor]], meta: Mapping[str, Any] | None = None
) -> None:
    """Save directions (plain dicts of CPU tensors keyed by parameter name) with `meta`.

    Loadable with torch.load(weights_only=True). `meta` must be JSON-like (seed, model
    name, ...). For scans of several models save the raw draws (make_directions(...,
    normalize=False) or a ScanResult's `.directions`).
    """
    meta = dict(meta or {})
    try:
        json.dumps(meta)
    except (TypeError, ValueError):
        raise SharpError("directions meta must be JSON-like (str, numbers, lists, dicts)") from None
    payload = {
        "format": DIRECTIONS_FORMAT,
        "directions": [{k: v.detach().cpu().clone().contiguous() for k, v in d.items()} for d in directions],
        "meta": meta,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_directions(path: str | Path) -> tuple[list[Direction], dict[str, Any]]:
    """Load `(directions, meta)` saved by save_directions (torch.load with weights_only=True)."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SharpError(f"no directions file at {path}: give a file written by save_directions") from None
    except Exception as exc:  # unpickling errors have many types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SharpError(
            f"{path} is not a directions file ({first}): give a file written by save_directions"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != DIRECTIONS_FORMAT:
        raise SharpError(f"{path} is not a directions file: give a file written by save_directions")
    return list(payload["directions"]), dict(payload["meta"])


@dataclass(kw_only=True)
class ScanResult(ProbeResult):
    """Loss and accuracy on a 1-D or 2-D grid around a model (Li et al. 2018)."""

    kind: ClassVar[str] = "random_direction_scan"
    alphas: list[float] = field(default_factory=list)
    betas: list[float] | None = None
    loss: list[float] | list[list[float]] = field(default_factory=list)  # [i_alpha] or [i_alpha][j_beta]
    accuracy: list[float] | list[list[float]] = field(default_factory=list)
    ignore: str = "biasbn"
    normalization: str = "filter"
    # The raw directions the scan used (as drawn from the seed, or as given): save these
    # with save_directions to scan another model on the same directions.
    directions: list[Direction] | None = field(default=None, metadata={"json": False})


def random_direction_scan(
    model: nn.Module,
    batches: Iterable[Batch],
    alphas: Sequence[float] | str,
    betas: Sequence[float] | str | None = None,
    directions: Sequence[Mapping[str, torch.Tensor]] | None = None,
    seed: int = 0,
    ignore: str = "biasbn",
    loss_fn: LossFn = cross_entropy,
    bn_mode: str = "eval",
    bn_data: Iterable[Batch] | None = None,
    bn_batch: int | None = None,
    progress: bool = False,
) -> ScanResult:
    """Loss along θ + α d₁ (1-D) or on θ + α d₁ + β d₂ (2-D) (Li et al. 2018).

    Directions are Gaussian draws from `seed` (or `directions`, raw or normalized to any
    model of this architecture), filter-normalized to THIS model before the scan, so two
    models scanned on the same saved draws each get directions scaled to their own filters,
    as Li et al. do. Only parameters move; BN statistics stay those of the scanned weights
    (bn_mode="eval": the model's own; "recompute": recomputed once at θ from `bn_data`) or
    BN uses batch statistics (bn_mode="batch", groups of `bn_batch`). The caller's model is
    not modified.
    """
    check_choice(ignore, "ignore", IGNORE_MODES)
    alpha_list = _as_alphas(alphas, "alphas")
    beta_list = None if betas is None else _as_alphas(betas, "betas")
    count = 1 if beta_list is None else 2
    probe = ProbeModel(model, batches, loss_fn, bn_mode=bn_mode, bn_data=bn_data, bn_batch=bn_batch)
    work = probe.model

    if directions is None:
        raw = _draw(work, count, seed)
        source = "seed"
    else:
        raw = [dict(d) for d in directions]
        if len(raw) != count:
            raise SharpError(
                f"{len(raw)} direction(s) given for a {count}-D scan: give {count} "
                f"({'alphas and betas' if count == 2 else 'alphas only'})"
            )
        source = "given"
    normalized = [filter_normalize(d, work, ignore) for d in raw]

    params = dict(work.named_parameters())
    base = {name: p.detach().clone() for name, p in params.items()}

    def evaluate(alpha: float, beta: float | None) -> tuple[float, float]:
        with torch.no_grad():
            for name, p in params.items():
                value = base[name] + alpha * normalized[0][name]
                if beta is not None:
                    value = value + beta * normalized[1][name]
                p.copy_(value)
        return probe.loss_and_accuracy()

    grid_b: list[float | None] = [None] if beta_list is None else list(beta_list)
    total = len(alpha_list) * len(grid_b)
    loss: list[Any] = []
    accuracy: list[Any] = []
    with progress_bar(total=total, desc="scanning", unit="point", enabled=progress) as bar:
        for alpha in alpha_list:
            row_loss, row_acc = [], []
            for beta in grid_b:
                value, acc = evaluate(alpha, beta)
                row_loss.append(value)
                row_acc.append(acc)
                bar.update(1)
            if beta_list is None:
                loss.append(row_loss[0])
                accuracy.append(row_acc[0])
            else:
                loss.append(row_loss)
                accuracy.append(row_acc)

    direction_norms = [math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values())) for d in normalized]
    model_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in base.values()))
    return ScanResult(
        **probe.result_fields(
            seed=seed if source == "seed" else None,
            directions_source=source,
            n_directions=count,
            draw="N(0, 1) per parameter in parameter order, float64 on a seeded CPU generator",
            direction_norms=direction_norms,
            model_norm=model_norm,
            renormalized_per_model=True,
        ),
        alphas=alpha_list,
        betas=beta_list,
        loss=loss,
        accuracy=accuracy,
        ignore=ignore,
        normalization="filter",
        directions=raw,
    )
