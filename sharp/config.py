"""Settings of `sharp train`: one dataclass, its validation, and loading from TOML/JSON.

Every field is also a command-line option (`batch_size` is `--batch-size`); the CLI is
generated from the field metadata below, so a setting cannot exist in one place only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from sharp.errors import SharpError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DATASETS = ("cifar10", "cifar100", "digits", "synthetic")
MODELS = (
    "resnet8",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "mlp",
    "convnet",
    "keskar-c1",
    "keskar-c2",
    "fc-tanh",
    "fc-relu",
)
NORMS = ("bn", "none", "group")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCALINGS = ("none", "linear", "sqrt")
WARMUP_STYLES = ("ml", "goyal")
SCHEDULES = ("constant", "step", "cosine")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp64")
BN_MODES = ("eval", "recompute", "batch")  # probe BN statistics (sharp.probes.bn); defined here only
HESSIAN_METHODS = ("lanczos", "power", "pyhessian")
TRACE_ESTIMATORS = ("hutchinson", "hutch++")  # sharp.probes.hessian.stochastic_trace; defined here only
NOISE_POOLS = ("train", "probe-set")
LOSSES = ("ce", "mse")
TRACK_BN_MODES = ("train", "eval")
INPUT_SCALINGS = ("standardize", "unit")
DEFAULT_MICRO_BATCH_CAP = 512
DEFAULT_EPOCHS = 10
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, **kw})


def parse_batch_size(text: str | int) -> int | str:
    """A --batch-size value: a positive whole number, or `full` (the whole training split)."""
    if str(text).strip().lower() == "full":
        return "full"
    try:
        return int(text)
    except ValueError:
        raise SharpError(f"--batch-size {text!r}: give a whole number of examples or `full`") from None


@dataclass
class TrainConfig:
    """Every setting of one training run; `None` means "derive it" (see `resolve`)."""

    # data
    dataset: str = _opt(
        "digits", "cifar10, cifar100, digits, synthetic[:N], or folder:PATH (train/ and test/)"
    )
    data_root: str = _opt("data", "where cifar10/cifar100 live (or are downloaded to)")
    download: bool = _opt(False, "download cifar10/cifar100 into --data-root if missing")
    train_subset: int | None = _opt(None, "seeded class-balanced subset of N training images")
    data_seed: int = _opt(0, "seed of the training subset and the evaluation subset")
    augment: bool | None = _opt(
        None, "random crop (pad 4) and flip; default on for cifar/folder, off otherwise"
    )
    input_scaling: str = _opt(
        "standardize",
        "standardize: pixels / 255 minus the training split's per-channel mean, over its std; "
        "unit: pixels / 255 alone (Keskar et al.'s Keras code)",
        INPUT_SCALINGS,
    )
    eval_train_size: int = _opt(2048, "size of the fixed training subset evaluated each time")
    test_subset: int | None = _opt(None, "evaluate on a seeded class-balanced subset of N test images")
    # model
    model: str = _opt(
        "resnet8",
        "resnet8/20/32/44/56/110 (6n+2), mlp, convnet, keskar-c1/c2 (Keskar et al.), fc-tanh/relu",
        MODELS,
    )
    width: float = _opt(1.0, "channel multiplier of the ResNet's 16/32/64 channels")
    norm: str = _opt("bn", "normalization layer", NORMS)
    bn_batch: int | None = _opt(None, "ghost BN: normalize groups of g examples (default: micro-batch)")
    # batch
    batch_size: int = _opt(
        128,
        "SGD batch B (examples per optimizer step), or `full`: the whole training split",
        parse=parse_batch_size,
    )
    full_batch: bool = _opt(False, "full-batch GD: one step per epoch over the whole training split")
    micro_batch: int | None = _opt(
        None, f"memory batch b; gradients accumulate over B/b (default: min(B, {DEFAULT_MICRO_BATCH_CAP}))"
    )
    drop_last: bool = _opt(False, "drop each epoch's final short batch")
    batch_schedule: str | None = _opt(
        None, 'increase the batch instead of decaying the lr: "0:128,60:640,120:3200" (epoch:batch)'
    )
    # optimizer and learning rate
    optimizer: str = _opt("sgd", "optimizer", OPTIMIZERS)
    momentum: float = _opt(0.0, "SGD momentum")
    weight_decay: float = _opt(0.0, "weight decay, applied by the optimizer once per step")
    lr: float | None = _opt(None, "absolute learning rate (default 0.1 for sgd, 1e-3 for adam/adamw)")
    base_lr: float | None = _opt(None, "base rate scaled by --lr-scaling with the batch size")
    lr_scaling: str = _opt("none", "lr = base_lr * B/ref (linear) or * sqrt(B/ref) (sqrt)", LR_SCALINGS)
    reference_batch: int = _opt(1, "ref of --lr-scaling (1: Masters & Luschi, 256: Goyal et al.)")
    warmup: float = _opt(0.0, "fraction of optimizer steps spent warming up linearly")
    warmup_style: str = _opt(
        "ml", "ml: from lr/32 (Masters & Luschi); goyal: from --base-lr (Goyal et al.)", WARMUP_STYLES
    )
    schedule: str = _opt("constant", "lr schedule over optimizer steps", SCHEDULES)
    milestones: str = _opt("0.5,0.75", "step schedule: fractions of the optimizer steps")
    gamma: float = _opt(0.1, "step schedule: factor applied at each milestone")
    # length
    epochs: int | None = _opt(None, f"epochs to train (default {DEFAULT_EPOCHS} unless --steps)")
    steps: int | None = _opt(None, "optimizer steps to train, instead of --epochs")
    until_train_loss: float | None = _opt(None, "stop early once the evaluated training loss is at most X")
    until_train_acc: float | None = _opt(
        None, "stop early once the evaluated training accuracy is at least X (a fraction, e.g. 0.99)"
    )
    eval_every: float = _opt(1.0, "evaluate every X epochs (fractions allowed)")
    checkpoint_every: int | None = _opt(None, "also keep checkpoints/epoch-NNNN.pt every K epochs")
    until_plateau: int | None = _opt(
        None, "stop once the evaluated training loss has not improved for K evaluations (Keskar et al.)"
    )
    plateau_tol: float = _opt(
        0.01, "--until-plateau: an improvement must lower the best loss by this fraction"
    )
    eval_batch: int | None = _opt(
        None,
        "examples per evaluation forward (default 1024 on GPU, 256 on CPU; 5000 for batch-statistics BN)",
    )
    noise_scale: bool = _opt(False, "log the online gradient noise scale B_simple")
    track_sharpness: int | None = _opt(
        None,
        "every K optimizer steps, log lambda_max (warm-started Lanczos), batch sharpness, grad_top_fraction",
    )
    track_set: str = _opt(
        "1000", "--track-sharpness set: N training examples (seeded, class-balanced, unaugmented) or full"
    )
    track_bn_mode: str = _opt(
        "train",
        "BN of the tracked loss: train (each batch's own ghost statistics, as the step sees them) or eval",
        TRACK_BN_MODES,
    )
    tensorboard: bool = _opt(False, "also write metrics as TensorBoard scalars to RUN/tensorboard/")
    # sharpness-aware minimization
    sam_rho: float = _opt(0.0, "SAM radius rho (0: off); each step then costs two passes (Foret et al.)")
    sam_adaptive: bool = _opt(False, "ASAM: the perturbation scaled elementwise by |w| (Kwon et al.)")
    sam_m: int | None = _opt(None, "m-SAM: the ascent per group of M examples of each micro-batch")
    # loss and initialization
    loss: str = _opt("ce", "ce (cross-entropy) or mse (1/2 |f(x) - onehot(y)|^2, Cohen et al.)", LOSSES)
    init_seed: int | None = _opt(None, "seed of the initial weights alone (default: --seed)")
    init_from: str | None = _opt(
        None, "start from another run's weights (RUN, RUN/final.pt or a checkpoint file); fresh optimizer"
    )
    # runtime
    seed: int = _opt(0, "seed of initialization, data order and augmentation")
    deterministic: bool = _opt(False, "use deterministic kernels (bit-reproducible runs)")
    device: str = _opt("auto", "device", DEVICES)
    precision: str = _opt("fp32", "fp32, bf16 (autocast) or fp64", PRECISIONS)
    channels_last: bool | None = _opt(None, "channels_last memory layout (default: on for conv nets)")
    compile: bool = _opt(False, "torch.compile the model (opt-in)")
    cuda_graphs: bool = _opt(
        False,
        "compile with CUDA graphs (reduce-overhead, fixed shapes): needs CUDA, --drop-last, one micro-batch",
    )
    tf32: bool = _opt(False, "let CUDA run fp32 matmuls and convolutions in TF32 (faster, 10-bit mantissa)")
    sync_bn: bool = _opt(False, "DDP: normalize BN over the micro-batches of all ranks together")

    command: ClassVar[str] = "train"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        validate(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def option_name(name: str) -> str:
    """The command-line spelling of a setting: `micro_batch` -> `--micro-batch`."""
    return "--" + name.replace("_", "-")


def parse_milestones(text: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SharpError(
            f'--milestones "{text}" is not a comma-separated list of fractions, e.g. "0.5,0.75"'
        ) from None
    if any(not 0 < v < 1 for v in values) or values != sorted(values):
        raise SharpError(f'--milestones "{text}": give increasing fractions strictly between 0 and 1')
    return values


def parse_batch_schedule(text: str) -> list[tuple[int, int]]:
    """`"0:128,60:640"` -> [(0, 128), (60, 640)] (epoch at which each batch size starts)."""
    try:
        pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise SharpError(f'--batch-schedule "{text}": write epoch:batch pairs, e.g. "0:128,60:640"')
    if pairs[0][0] != 0:
        raise SharpError(f'--batch-schedule "{text}" must start at epoch 0, e.g. "0:128,..."')
    epochs = [p[0] for p in pairs]
    if epochs != sorted(set(epochs)):
        raise SharpError(f'--batch-schedule "{text}": epochs must increase')
    if any(b <= 0 for _, b in pairs):
        raise SharpError(f'--batch-schedule "{text}": batch sizes must be positive')
    return [(e, b) for e, b in pairs]


def _finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(*, spelling: Literal["option", "argument"] = "option", **values: float | None) -> None:
    """The one positive-number check: each value given (None: not given) must be a finite number
    > 0. The keyword names the value in the one-line SharpError: as its option (`train_set=0`:
    "--train-set 0 must be positive"), or with spelling="argument" as the Python argument of a
    library function (`eps=0.0`: "eps=0.0 is not allowed: give a positive finite number")."""
    for name, value in values.items():
        if value is None or (_finite_number(value) and value > 0):
            continue
        if spelling == "argument":
            raise SharpError(f"{name}={value!r} is not allowed: give a positive finite number")
        wanted = "positive" if _finite_number(value) else "a positive finite number"
        raise SharpError(f"{option_name(name)} {value} must be {wanted}")


def check_choice(value: Any, option: str, choices: Sequence[str]) -> Any:
    """The one one-of-choices check; `option` names the value as the user gave it (`--bn`)."""
    if value not in choices:
        raise SharpError(f"{option} {value!r} is unknown: choose one of {', '.join(choices)}")
    return value


def _non_negative(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not value >= 0:
            raise SharpError(f"{option_name(name)} {value} must be zero or positive")


def validate(cfg: TrainConfig) -> None:
    """Check every setting before any work; raise SharpError naming the option to change."""
    _check_choices(cfg)
    dataset = cfg.dataset
    name = dataset.split(":", 1)[0]
    if name not in (*DATASETS, "folder"):
        raise SharpError(
            f"--dataset {dataset!r} is unknown: choose cifar10, cifar100, digits, synthetic or folder:PATH"
        )
    from sharp.models import model_norms  # here, not at the top: the CLI parses without torch

    if cfg.norm not in model_norms(cfg.model):
        raise SharpError(
            f"--model {cfg.model} takes --norm {' or '.join(model_norms(cfg.model))}, not --norm {cfg.norm}"
        )
    if name == "folder" and not dataset[len("folder:") :]:
        raise SharpError("--dataset folder: needs a path, e.g. folder:/data/cifar10-jpeg")
    if name == "synthetic" and ":" in dataset:
        size = dataset.split(":", 1)[1]
        if not size.isdigit() or int(size) < 2:
            raise SharpError(f"--dataset {dataset!r}: write synthetic:N with N >= 2 training images")
    positive = (
        "batch_size",
        "micro_batch",
        "bn_batch",
        "train_subset",
        "eval_train_size",
        "test_subset",
        "width",
        "reference_batch",
        "epochs",
        "steps",
        "eval_every",
        "checkpoint_every",
        "lr",
        "base_lr",
        "gamma",
        "until_train_loss",
        "until_train_acc",
        "until_plateau",
        "eval_batch",
        "track_sharpness",
    )
    check_positive(**{name: getattr(cfg, name) for name in positive})
    _non_negative(cfg, "momentum", "weight_decay", "plateau_tol", "sam_rho")
    _check_sam(cfg)
    if not 0 <= cfg.warmup < 1:
        raise SharpError(f"--warmup {cfg.warmup} is a fraction of the steps: choose 0 <= x < 1")
    if cfg.full_batch:
        _check_full_batch(cfg)
        return  # the batch is known once the data is: build() resolves it and validates again
    if cfg.micro_batch is not None and cfg.micro_batch > cfg.batch_size and not cfg.batch_schedule:
        raise SharpError(
            f"--micro-batch {cfg.micro_batch} is larger than --batch-size {cfg.batch_size}: "
            "the micro-batch splits the batch, so choose one no larger"
        )
    micro = resolved_micro_batch(cfg, cfg.batch_size)
    if cfg.bn_batch is not None:
        if cfg.norm != "bn":
            raise SharpError(f"--bn-batch applies to --norm bn only, not --norm {cfg.norm}")
        if cfg.bn_batch > micro:
            raise SharpError(
                f"--bn-batch {cfg.bn_batch} is larger than the micro-batch {micro}: a BN group must "
                "fit in one forward pass, so raise --micro-batch or lower --bn-batch"
            )
    if cfg.lr is not None and cfg.base_lr is not None:
        raise SharpError("give either --lr (absolute) or --base-lr (scaled), not both")
    if cfg.lr_scaling != "none" and cfg.base_lr is None:
        raise SharpError(f"--lr-scaling {cfg.lr_scaling} scales --base-lr: give --base-lr")
    if cfg.warmup_style == "goyal" and cfg.warmup > 0 and cfg.base_lr is None:
        raise SharpError("--warmup-style goyal starts from --base-lr: give --base-lr")
    if cfg.epochs is not None and cfg.steps is not None:
        raise SharpError("give either --epochs or --steps, not both")
    if cfg.schedule == "step":
        parse_milestones(cfg.milestones)
    if cfg.batch_schedule:
        for batch in batch_sizes(cfg):
            if cfg.micro_batch is not None and cfg.micro_batch > batch:
                raise SharpError(
                    f"--micro-batch {cfg.micro_batch} is larger than batch {batch} of --batch-schedule"
                )
    if cfg.noise_scale:
        for batch in batch_sizes(cfg):
            if resolved_micro_batch(cfg, batch) >= batch:
                raise SharpError(
                    f"--noise-scale needs --micro-batch smaller than --batch-size (batch {batch}): it "
                    f"compares micro-batch with batch gradients: e.g. --micro-batch {batch // 4 or 1}"
                )
    if cfg.sync_bn and (cfg.norm != "bn" or cfg.bn_batch is not None):
        raise SharpError(
            "--sync-bn normalizes whole micro-batches across ranks: use --norm bn without --bn-batch"
        )
    if cfg.until_train_acc is not None and cfg.until_train_acc > 1:
        raise SharpError(
            f"--until-train-acc {cfg.until_train_acc} is a fraction: choose 0 < x <= 1, e.g. 0.99"
        )
    track_set_size(cfg.track_set)
    if cfg.track_sharpness and cfg.optimizer != "sgd":
        raise SharpError(
            f"--track-sharpness takes --optimizer sgd, not {cfg.optimizer}: Adam's edge of stability is on "
            "the preconditioned Hessian (Cohen et al. 2022), which is not tracked"
        )
    if cfg.compile and cfg.precision == "fp64":
        raise SharpError("--compile is not supported with --precision fp64: drop one of them")
    if cfg.cuda_graphs:
        _check_cuda_graphs(cfg)


def _check_cuda_graphs(cfg: TrainConfig) -> None:
    """--cuda-graphs replays kernels recorded for fixed shapes (torch.compile mode reduce-overhead)."""
    if cfg.device == "cpu":
        raise SharpError("--cuda-graphs needs a CUDA device: drop --device cpu or --cuda-graphs")
    if not cfg.drop_last:
        raise SharpError(
            "--cuda-graphs needs fixed shapes: add --drop-last (a short last batch would re-record)"
        )
    if cfg.precision == "fp64":
        raise SharpError(
            "--cuda-graphs compiles the model, which --precision fp64 does not support: drop one"
        )
    if cfg.sam_m or any(resolved_micro_batch(cfg, b) < b for b in batch_sizes(cfg)):
        # torch's CUDA graphs install a replay's output buffer as .grad, and the next micro-batch's
        # replay overwrites it (pytorch/pytorch#169545): accumulated gradients would be wrong
        raise SharpError(
            "--cuda-graphs takes one micro-batch per step (CUDA graphs break gradient accumulation): "
            "set --micro-batch to the batch size, and no --sam-m"
        )


def _check_full_batch(cfg: TrainConfig) -> None:
    for name, given in (("batch_schedule", cfg.batch_schedule), ("lr_scaling", cfg.lr_scaling != "none")):
        if given:
            raise SharpError(
                f"--batch-size full takes no {option_name(name)}: the batch is the training split "
                "(give an absolute --lr)"
            )


def batch_sizes(cfg: TrainConfig) -> list[int]:
    """Every SGD batch size the run uses: the --batch-schedule's, or --batch-size."""
    return (
        [b for _, b in parse_batch_schedule(cfg.batch_schedule)] if cfg.batch_schedule else [cfg.batch_size]
    )


def _check_sam(cfg: TrainConfig) -> None:
    if not cfg.sam_rho:
        for name in ("sam_m", "sam_adaptive"):
            if getattr(cfg, name):
                raise SharpError(
                    f"{option_name(name)} modifies SAM: give --sam-rho too (e.g. --sam-rho 0.05)"
                )
        return
    check_positive(sam_m=cfg.sam_m)
    if cfg.sam_m is None:
        return
    if cfg.noise_scale:
        raise SharpError(
            "--noise-scale reads the window's first-pass gradient, which m-SAM never forms: drop --sam-m, "
            "or measure the noise scale offline with sharp probe --noise-scale"
        )
    for batch in batch_sizes(cfg):
        micro = resolved_micro_batch(cfg, batch)
        if micro % cfg.sam_m:
            raise SharpError(
                f"--sam-m {cfg.sam_m} does not divide the micro-batch {micro}: m-SAM takes its ascent per "
                "group of M examples of each micro-batch, so choose a divisor"
            )


@dataclass
class ProbeConfig:
    """Settings of `sharp probe` (and of a sweep's `[probe]` table)."""

    command: ClassVar[str] = "probe"
    checkpoint: str = _opt("final", "final, all (every epoch checkpoint and final), or a checkpoint path")
    probe_set: int = _opt(1024, "size of the seeded class-balanced training subset probed (no augmentation)")
    probe_seed: int = _opt(0, "seed of the probe set")
    probe_batch: int = _opt(256, "batch size of the probe passes")
    bn_mode: str = _opt(
        "eval",
        "BN statistics: running (eval), recomputed at the probed weights from the training split "
        "(recompute), or each BN group's own (batch, groups of --bn-batch)",
        BN_MODES,
    )
    bn_batch: int | None = _opt(
        None,
        "--bn-mode batch: normalize groups of N consecutive probe examples (default: the run's eval_batch)",
    )
    bn_set: int | None = _opt(
        None,
        "--bn-mode recompute: a seeded subset of N training examples instead of the whole training split",
    )
    device: str = _opt("auto", "device", DEVICES)
    precision: str = _opt("fp32", "fp32 or fp64", ("fp32", "fp64"))
    tf32: bool = _opt(False, "allow TF32 matmuls and convolutions on CUDA (probes keep it off)")
    deterministic: bool = _opt(False, "deterministic kernels during the probes")
    threads: int | None = _opt(None, "CPU threads during the probes (default: as the process has)")
    seed: int = _opt(0, "seed of the probes' random draws")
    sharpness: bool = _opt(False, "Keskar's epsilon-sharpness (L-BFGS-B over the box)")
    eps: str = _opt("1e-3,5e-4", "epsilon values of --sharpness")
    subspace: int | None = _opt(
        None, "also measure sharpness in a random subspace of this dimension (Keskar: 100)"
    )
    full_space: bool = _opt(True, "measure full-space sharpness")
    maxiter: int = _opt(10, "L-BFGS-B iterations per start of --sharpness")
    random_starts: int = _opt(
        1, "seeded random L-BFGS-B starts besides y = 0 (their spread is the uncertainty)"
    )
    adaptive: bool = _opt(False, "worst-case adaptive sharpness (Andriushchenko et al.)")
    average: bool = _opt(False, "average-case adaptive sharpness (Gaussian perturbations)")
    rho: str | None = _opt(None, "radii of --adaptive (default: the paper's smallest for --adaptive-norm)")
    adaptive_norm: str = _opt("linf", "norm of --adaptive", ("linf", "l2"))
    average_rho: str | None = _opt(
        None, "radii of --average (default: the paper's smallest for --average-norm)"
    )
    average_norm: str = _opt("l2", "norm of --average: Gaussian (l2) or uniform (linf) noise", ("linf", "l2"))
    hessian: bool = _opt(False, "top Hessian eigenvalues")
    top_k: int = _opt(5, "number of eigenvalues of --hessian")
    method: str = _opt(
        "lanczos",
        "eigenvalue method (power: PyHessian's algorithm; pyhessian: PyHessian itself, also for --trace)",
        HESSIAN_METHODS,
    )
    tol: float = _opt(1e-3, "relative tolerance of --hessian")
    keep_graph: bool | None = _opt(
        None, "keep the double-backward graph of the whole probe set (default: up to 1024 examples)"
    )
    trace: bool = _opt(False, "Hessian trace (Hutchinson) with its standard error")
    trace_samples: int = _opt(100, "at most this many Rademacher vectors (HVPs) for --trace")
    trace_estimator: str = _opt(
        "hutchinson",
        "estimator of --trace: hutchinson, or hutch++ (a third of the HVPs sketch the top of the spectrum)",
        TRACE_ESTIMATORS,
    )
    density: bool = _opt(False, "Hessian spectral density (stochastic Lanczos quadrature)")
    density_iter: int = _opt(100, "Lanczos steps (HVPs) per run of --density")
    density_runs: int = _opt(1, "random starting vectors of --density, averaged (PyHessian: 1)")
    landscape: bool = _opt(False, "loss along filter-normalized random directions (Li et al.)")
    landscape_range: str = _opt("-1:1:21", "start:stop:count of the --landscape scan")
    landscape_2d: bool = _opt(False, "scan a plane (two directions) instead of a line")
    noise_scale: bool = _opt(False, "gradient noise scale B_simple at the checkpoint")
    b_small: int = _opt(32, "small batch of --noise-scale")
    b_big: int = _opt(512, "big batch of --noise-scale")
    norms: bool = _opt(
        False, "weight norms: l2, distance from epoch-0000.pt, path norm (no BN), sum of squared Frobenius"
    )
    noise_pool: str = _opt(
        "train", "--noise-scale draws its batches from the whole training split or the probe set", NOISE_POOLS
    )
    reparam_check: float | None = _opt(
        None, "also run every probe at weights rescaled by ALPHA (same function; Dinh et al. 2017)"
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        positive = (
            "probe_set",
            "probe_batch",
            "top_k",
            "maxiter",
            "tol",
            "subspace",
            "b_small",
            "b_big",
            "trace_samples",
            "density_iter",
            "density_runs",
            "bn_set",
            "threads",
            "reparam_check",
        )
        check_positive(**{name: getattr(self, name) for name in positive})
        if self.random_starts < 0:
            raise SharpError(f"--random-starts {self.random_starts} must be zero or positive")
        if self.trace_samples < 2:
            raise SharpError(
                f"--trace-samples {self.trace_samples}: a standard error needs at least 2 samples"
            )
        if self.trace_estimator == "hutch++" and self.trace_samples < 6:
            raise SharpError(
                f"--trace-estimator hutch++ with --trace-samples {self.trace_samples}: the sketch takes two "
                "thirds and a standard error needs 2 more: give at least 6"
            )
        if self.trace and self.trace_estimator == "hutch++" and self.method == "pyhessian":
            raise SharpError(
                "--method pyhessian traces by PyHessian's Hutchinson: drop it or --trace-estimator hutch++"
            )
        parse_positive_list(self.eps, "--eps")
        for name in ("rho", "average_rho"):
            if getattr(self, name) is not None:
                parse_positive_list(getattr(self, name), option_name(name))
        if self.bn_batch is not None and (self.bn_mode != "batch" or self.bn_batch < 2):
            raise SharpError(
                f"--bn-batch {self.bn_batch} sets the BN groups of --bn-mode batch: use it with "
                "--bn-mode batch and a group of at least 2"
            )
        if self.bn_set is not None and self.bn_mode != "recompute":
            raise SharpError(
                "--bn-set chooses the examples of --bn-mode recompute: use it with --bn-mode recompute"
            )
        if self.sharpness and not self.full_space and not self.subspace:
            raise SharpError("--no-full-space needs --subspace P: there is no space left to measure")
        if self.density and self.method == "pyhessian":
            raise SharpError(
                "--density has no pyhessian method: pyhessian 0.1's density() calls torch.eig, which torch "
                "removed; drop --method pyhessian for the density"
            )
        if self.noise_scale and self.b_small >= self.b_big:
            raise SharpError(f"--b-small {self.b_small} must be smaller than --b-big {self.b_big}")
        if self.noise_scale and self.noise_pool == "probe-set" and self.b_small + self.b_big > self.probe_set:
            raise SharpError(
                f"--b-small {self.b_small} + --b-big {self.b_big} exceed --probe-set {self.probe_set}: "
                "the two batches are drawn disjoint from the probe set, so raise --probe-set or lower --b-big"
            )

    def any_probe(self) -> bool:
        return any(getattr(self, name) for name in PROBE_FLAGS)


PROBE_FLAGS = (
    "sharpness", "adaptive", "average", "hessian", "trace", "density", "landscape", "noise_scale", "norms",
)  # fmt: skip


def parse_positive_list(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SharpError(f"{option} {text!r} is not a comma-separated list of numbers") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise SharpError(f"{option} {text!r}: give positive numbers, e.g. 1e-3,5e-4")
    return values


def track_set_size(text: str) -> int | None:
    """`--track-set`: the number of tracking examples, or None for `full` (the whole training split)."""
    if str(text).strip() == "full":
        return None
    if not str(text).strip().isdigit() or int(text) < 1:
        raise SharpError(f"--track-set {text!r}: give a positive number of training examples or full")
    return int(text)


def resolved_micro_batch(cfg: TrainConfig, batch_size: int) -> int:
    """The micro-batch used for a step of `batch_size` examples."""
    if cfg.micro_batch is not None:
        return min(cfg.micro_batch, batch_size)
    return min(batch_size, DEFAULT_MICRO_BATCH_CAP)


def initial_batch_size(cfg: TrainConfig) -> int:
    if cfg.batch_schedule:
        return parse_batch_schedule(cfg.batch_schedule)[0][1]
    return cfg.batch_size


def peak_lr(cfg: TrainConfig) -> float:
    """The learning rate after warm-up and before any decay (Masters & Luschi: lr = m * base)."""
    if cfg.lr is not None:
        return cfg.lr
    if cfg.base_lr is None:
        return DEFAULT_LR[cfg.optimizer]
    ratio = initial_batch_size(cfg) / cfg.reference_batch
    if cfg.lr_scaling == "linear":
        return cfg.base_lr * ratio
    if cfg.lr_scaling == "sqrt":
        return cfg.base_lr * math.sqrt(ratio)
    return cfg.base_lr


def read_table(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file (JSON by its suffix) as a table; `what` names it in the one-line errors
    (`--config`, `sweep spec`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SharpError(f"{what} {path}: cannot read it ({exc.strerror})") from None
    is_json = path.suffix == ".json"
    try:
        data = json.loads(text) if is_json else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise SharpError(f"{what} {path} is not valid {'JSON' if is_json else 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise SharpError(f"{what} {path} must hold a table of settings")
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file, or from a run's config.json (its `settings` table)."""
    data = read_table(path, "--config")
    if Path(path).suffix == ".json" and isinstance(data.get("settings"), dict):
        return data["settings"]
    return data


def make_config(file_settings: dict[str, Any], overrides: dict[str, Any], cls: type | None = None) -> Any:
    """Defaults, then the config file, then the command line; unknown keys are an error.

    `cls` is TrainConfig (the default) or ProbeConfig.
    """
    cls = cls or TrainConfig
    fields = {f.name: f for f in dataclasses.fields(cls)}
    merged = {**file_settings, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(merged) - set(fields))
    if unknown:
        raise SharpError(
            f"unknown setting {unknown[0]!r} in the config: settings are the options of "
            f"`sharp {cls.command}` with underscores"
        )
    if cls is TrainConfig and merged.get("batch_size") == "full":
        merged.pop("batch_size")
        merged["full_batch"] = True
    for name, value in merged.items():
        if isinstance(value, list) and field_types(cls)[name][0] is str:
            merged[name] = ",".join(str(v) for v in value)  # TOML lists for comma-separated options
    cfg = cls(**{k: _coerce(cls, k, v) for k, v in merged.items()})
    _check_choices(cfg)
    cfg.validate()
    return cfg


def _check_choices(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        _check_value(f, getattr(cfg, f.name))


def _check_value(f: dataclasses.Field, value: Any) -> None:
    if f.metadata.get("choices"):
        check_choice(value, option_name(f.name), f.metadata["choices"])
    if isinstance(value, float) and not math.isfinite(value):
        raise SharpError(f"{option_name(f.name)} must be a finite number, not {value}")


def resolve_settings(cls: type, **given: Any) -> dict[str, Any]:
    """Some of a settings class's fields, for a command that takes only those (declared with
    `cli.settings_options(cls, names)`): the default for each not given (None), and each
    checked as `make_config` checks a whole config."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    resolved = {}
    for name, value in given.items():
        value = fields[name].default if value is None else _coerce(cls, name, value)
        _check_value(fields[name], value)
        resolved[name] = value
    return resolved


@functools.cache
def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """{setting: (its type, whether it may be None)}, from the dataclass's annotations.

    `typing.get_type_hints` reads them, rather than a dataclass-driven CLI library (tyro,
    simple-parsing): those build argparse parsers where sharp's commands are click, and the
    few lines here are all that the generated options and the config-file checks need.
    """
    hints = typing.get_type_hints(cls)
    types = {}
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name])  # (int, NoneType) for `int | None`
        kinds = [a for a in args if a is not type(None)] or [hints[f.name]]
        types[f.name] = (kinds[0], type(None) in args)
    return types


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Check a config-file value against the field's type (ints are accepted as floats)."""
    kind, optional = field_types(cls)[name]
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a count in a text option: track_set = 1000
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SharpError(f"setting {name} = {value!r} must be {kind.__name__}")
    return value
