"""Settings of `sharp train`: one dataclass, its validation, and loading from TOML/JSON.

Every field is also a command-line option (`batch_size` is `--batch-size`); the CLI is
generated from the field metadata below, so a setting cannot exist in one place only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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
BN_MODES = ("eval", "batch")
LOSSES = ("ce", "mse")
TRACK_BN_MODES = ("train", "eval")
DEFAULT_MICRO_BATCH_CAP = 512
DEFAULT_EPOCHS = 10
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, **kw})


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
    batch_size: int = _opt(128, "SGD batch B (examples per optimizer step)")
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


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise SharpError(f"{option_name(name)} {value} must be positive")


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
    _positive(
        cfg,
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
    _non_negative(cfg, "momentum", "weight_decay", "plateau_tol")
    if not 0 <= cfg.warmup < 1:
        raise SharpError(f"--warmup {cfg.warmup} is a fraction of the steps: choose 0 <= x < 1")
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
        for _, batch in parse_batch_schedule(cfg.batch_schedule):
            if cfg.micro_batch is not None and cfg.micro_batch > batch:
                raise SharpError(
                    f"--micro-batch {cfg.micro_batch} is larger than batch {batch} of --batch-schedule"
                )
    if cfg.noise_scale:
        batches = [b for _, b in parse_batch_schedule(cfg.batch_schedule)] if cfg.batch_schedule else []
        for batch in batches or [cfg.batch_size]:
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


@dataclass
class ProbeConfig:
    """Settings of `sharp probe` (and of a sweep's `[probe]` table)."""

    command: ClassVar[str] = "probe"
    checkpoint: str = _opt("final", "final, all (every epoch checkpoint and final), or a checkpoint path")
    probe_set: int = _opt(1024, "size of the seeded class-balanced training subset probed (no augmentation)")
    probe_seed: int = _opt(0, "seed of the probe set")
    probe_batch: int = _opt(256, "batch size of the probe passes")
    bn_mode: str = _opt("eval", "BN statistics: running (eval) or each probe batch's own (batch)", BN_MODES)
    device: str = _opt("auto", "device", DEVICES)
    precision: str = _opt("fp32", "fp32 or fp64", ("fp32", "fp64"))
    seed: int = _opt(0, "seed of the probes' random draws")
    sharpness: bool = _opt(False, "Keskar's epsilon-sharpness (L-BFGS-B over the box)")
    eps: str = _opt("1e-3,5e-4", "epsilon values of --sharpness")
    subspace: int | None = _opt(
        None, "also measure sharpness in a random subspace of this dimension (Keskar: 100)"
    )
    full_space: bool = _opt(True, "measure full-space sharpness")
    maxiter: int = _opt(10, "L-BFGS-B iterations of --sharpness")
    adaptive: bool = _opt(False, "worst-case adaptive sharpness (Andriushchenko et al.)")
    average: bool = _opt(False, "average-case adaptive sharpness (Gaussian perturbations)")
    rho: str = _opt("0.0005", "radii of --adaptive and --average")
    adaptive_norm: str = _opt("linf", "norm of --adaptive", ("linf", "l2"))
    hessian: bool = _opt(False, "top Hessian eigenvalues")
    top_k: int = _opt(5, "number of eigenvalues of --hessian")
    method: str = _opt("lanczos", "eigenvalue method (power is PyHessian's)", ("lanczos", "power"))
    tol: float = _opt(1e-3, "relative tolerance of --hessian")
    trace: bool = _opt(False, "Hessian trace (Hutchinson) with its standard error")
    trace_samples: int = _opt(100, "at most this many Rademacher vectors (HVPs) for --trace")
    density: bool = _opt(False, "Hessian spectral density (stochastic Lanczos quadrature)")
    density_iter: int = _opt(100, "Lanczos steps (HVPs) per run of --density")
    density_runs: int = _opt(1, "random starting vectors of --density, averaged (PyHessian: 1)")
    landscape: bool = _opt(False, "loss along filter-normalized random directions (Li et al.)")
    landscape_range: str = _opt("-1:1:21", "start:stop:count of the --landscape scan")
    landscape_2d: bool = _opt(False, "scan a plane (two directions) instead of a line")
    noise_scale: bool = _opt(False, "gradient noise scale B_simple at the checkpoint")
    b_small: int = _opt(32, "small batch of --noise-scale")
    b_big: int = _opt(512, "big batch of --noise-scale")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        _positive(
            self,
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
        )
        if self.trace_samples < 2:
            raise SharpError(
                f"--trace-samples {self.trace_samples}: a standard error needs at least 2 samples"
            )
        parse_positive_list(self.eps, "--eps")
        parse_positive_list(self.rho, "--rho")
        if self.sharpness and not self.full_space and not self.subspace:
            raise SharpError("--no-full-space needs --subspace P: there is no space left to measure")
        if self.noise_scale and self.b_small >= self.b_big:
            raise SharpError(f"--b-small {self.b_small} must be smaller than --b-big {self.b_big}")
        if self.noise_scale and self.b_small + self.b_big > self.probe_set:
            raise SharpError(
                f"--b-small {self.b_small} + --b-big {self.b_big} exceed --probe-set {self.probe_set}: "
                "the two batches are drawn disjoint from the probe set, so raise --probe-set or lower --b-big"
            )

    def any_probe(self) -> bool:
        return any(getattr(self, name) for name in PROBE_FLAGS)


PROBE_FLAGS = ("sharpness", "adaptive", "average", "hessian", "trace", "density", "landscape", "noise_scale")


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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file, or from a run's config.json (its `settings` table)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SharpError(f"--config {path}: cannot read it ({exc.strerror})") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
            data = data.get("settings", data)
        else:
            data = tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise SharpError(f"--config {path} is not valid {path.suffix[1:] or 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise SharpError(f"--config {path} must hold a table of settings")
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
    for name, value in merged.items():
        if isinstance(value, list) and str(fields[name].type).startswith("str"):
            merged[name] = ",".join(str(v) for v in value)  # TOML lists for comma-separated options
    cfg = cls(**{k: _coerce(fields[k], v) for k, v in merged.items()})
    _check_choices(cfg)
    cfg.validate()
    return cfg


def _check_choices(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise SharpError(
                f"{option_name(f.name)} {value!r} is unknown: choose one of {', '.join(choices)}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise SharpError(f"{option_name(f.name)} must be a finite number, not {value}")


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Check a config-file value against the field's type (ints are accepted as floats)."""
    annotation = str(f.type)
    base = _TYPES[annotation.split(" ")[0]]
    if value is None and "None" in annotation:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a count in a text option: track_set = 1000
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise SharpError(f"setting {f.name} = {value!r} must be {annotation.replace(' | None', '')}")
    return value
