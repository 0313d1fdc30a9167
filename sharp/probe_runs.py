"""Glue between run directories and probes: load a run's model and probe set, run probes,
write one JSON per probe and checkpoint under RUN/probes/, skip what is already there.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sharp import __version__, runtime
from sharp.config import ProbeConfig, parse_positive_list
from sharp.data import (
    Dataset,
    DeviceLoader,
    balanced_subset,
    evaluation_subset,
    input_normalization,
    load_dataset,
)
from sharp.errors import SharpError
from sharp.losses import mean_loss
from sharp.models import build_model
from sharp.probes.reparam import rescale
from sharp.runs import RunDir, atomic_write_json, load_checkpoint

if TYPE_CHECKING:
    from sharp.probes.norms import NormsResult

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RunData:
    """A run's settings and dataset, and the training split exactly as the run saw it."""

    run: RunDir
    settings: dict[str, Any]
    derived: dict[str, Any]
    dataset: Dataset
    train_index: torch.Tensor

    @classmethod
    def open(cls, path: str | Path, dataset: Dataset | None = None) -> RunData:
        run = RunDir(path)
        if not run.is_run():
            raise SharpError(
                f"{path} is not a run directory (no config.json); give a directory made by sharp train"
            )
        config = run.read_config()
        settings, derived = config["settings"], config["derived"]
        data = dataset or load_dataset(settings["dataset"], settings["data_root"], download=False)
        subset = settings.get("train_subset")
        index = (
            balanced_subset(data.train_labels, subset, settings["data_seed"])
            if subset
            else torch.arange(len(data.train_labels))
        )
        return cls(run, settings, derived, data, index)

    def build_model(self) -> nn.Module:
        s, d = self.settings, self.derived
        return build_model(
            s["model"],
            d["in_channels"],
            d["num_classes"],
            d["image_size"],
            s["width"],
            s["norm"],
            s["bn_batch"],
        )

    def load_model(self, checkpoint: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
        state = _model_state(load_checkpoint(checkpoint))
        model = self.build_model()
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise SharpError(f"{checkpoint} does not fit the run's model ({first})") from None
        return model.to(device=device, dtype=dtype).eval()

    def checkpoints(self, which: str) -> list[tuple[str, Path]]:
        """`final`, `all` (every epoch checkpoint, then final) or a path: (label, path) pairs."""
        run = self.run
        if which == "final":
            if not run.final.exists():
                raise SharpError(
                    f"{run.path} has no final.pt (state: {run.status().get('state')}); "
                    "finish or resume the run, or pass --checkpoint all|PATH"
                )
            return [("final", run.final)]
        if which == "all":
            found = [(p.stem, p) for p in run.epoch_checkpoints()]
            if run.final.exists():
                found.append(("final", run.final))
            if not found:
                raise SharpError(f"{run.path} has no checkpoints: train with --checkpoint-every K")
            return found
        path = Path(which)
        if not path.is_file():
            path = run.path / which
        if not path.is_file():
            raise SharpError(f"--checkpoint {which}: no such file; use final, all or a checkpoint path")
        return [(path.stem, path)]

    def loader(
        self, split: str, n: int | None, seed: int, device: torch.device, dtype: torch.dtype
    ) -> DeviceLoader:
        """A seeded class-balanced subset of the run's training split (or the test split) in a seeded
        random order (`evaluation_subset`), unaugmented, scaled as the run's training saw it
        (`--input-scaling`)."""
        data = self.dataset
        if split == "train":
            images, labels = data.train_images[self.train_index], data.train_labels[self.train_index]
        else:
            images, labels = data.test_images, data.test_labels
        chosen = evaluation_subset(labels, n, seed)
        images, labels = images[chosen], labels[chosen]
        mean, std = input_normalization(data, self.settings.get("input_scaling", "standardize"))
        return DeviceLoader(images, labels, mean, std, device=device, dtype=dtype)


@dataclass
class ProbeTask:
    """One probe to run on each checkpoint: a label for its file and the call that computes it.

    `pool`: the probe draws its batches from a pool of examples (the noise scale), which
    `run_probes` supplies from the run.
    """

    label: str
    func: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    pool: bool = False


class SplitBatches:
    """A run's training split (or a subset of it), unaugmented, as batches: iterable again and
    again (recomputing BN statistics passes over it once per BN layer)."""

    def __init__(self, loader: DeviceLoader, batch_size: int) -> None:
        self.loader, self.batch_size = loader, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.loader.batches(self.batch_size)

    def __len__(self) -> int:
        return len(self.loader)


class LoaderPool:
    """A run's training split as an ExamplePool: examples normalized when drawn, never all at once."""

    def __init__(self, loader: DeviceLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(self.loader.images.device)
        return self.loader.normalize(self.loader.images[index]), self.loader.labels[index]


def settings_key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def probe_path(run: RunDir, checkpoint_label: str, task: ProbeTask, context: dict[str, Any]) -> Path:
    key = settings_key({"task": task.label, "kwargs": task.kwargs, **context})
    return run.probes / f"{checkpoint_label}.{task.label}.{key}.json"


def _radius_tasks(
    name: str, probe: Callable[..., Any], norm: str, rho: str | None, option: str, seed: int
) -> list[ProbeTask]:
    """One task per radius of the adaptive (worst-case, `name="adaptive"`) or average sharpness
    probe: the radii `rho` lists (from the CLI `option`), or `default_rho`'s one when none."""
    from sharp.probes.sharpness import default_rho

    kind = "worst" if name == "adaptive" else "average"
    radii = [default_rho(kind, norm, True)] if rho is None else parse_positive_list(rho, option)
    return [ProbeTask(f"{name}-{norm}-rho{r:g}", probe, dict(rho=r, norm=norm, seed=seed)) for r in radii]


def probe_tasks(cfg: ProbeConfig) -> list[ProbeTask]:
    """The probes a ProbeConfig asks for, one task per probe and setting (each eps, each rho, ...)."""
    tasks = []
    if cfg.sharpness:
        from sharp.probes.sharpness import epsilon_sharpness

        spaces = ([None] if cfg.full_space else []) + ([cfg.subspace] if cfg.subspace else [])
        for eps in parse_positive_list(cfg.eps, "--eps"):
            for space in spaces:
                label = f"sharpness-eps{eps:g}-{'full' if space is None else f'sub{space}'}"
                kwargs = dict(
                    eps=eps,
                    subspace_dim=space,
                    maxiter=cfg.maxiter,
                    random_starts=cfg.random_starts,
                    seed=cfg.seed,
                )
                tasks.append(ProbeTask(label, epsilon_sharpness, kwargs))
    if cfg.adaptive:
        from sharp.probes.sharpness import adaptive_sharpness

        tasks += _radius_tasks("adaptive", adaptive_sharpness, cfg.adaptive_norm, cfg.rho, "--rho", cfg.seed)
    if cfg.average:
        from sharp.probes.sharpness import average_sharpness

        tasks += _radius_tasks(
            "average", average_sharpness, cfg.average_norm, cfg.average_rho, "--average-rho", cfg.seed
        )
    if cfg.hessian or cfg.trace or cfg.density:
        from sharp.probes.hessian import hessian_density, hessian_top_eigenvalues, hessian_trace

        graph = {"keep_graph": cfg.keep_graph}
        if cfg.hessian:
            kwargs = dict(k=cfg.top_k, method=cfg.method, tol=cfg.tol, seed=cfg.seed, **graph)
            tasks.append(ProbeTask(f"hessian-top{cfg.top_k}-{cfg.method}", hessian_top_eigenvalues, kwargs))
        if cfg.trace:
            method = "pyhessian" if cfg.method == "pyhessian" else "hutchinson"
            residual = cfg.trace_samples - 2 * (cfg.trace_samples // 3) * (cfg.trace_estimator == "hutch++")
            kwargs = dict(
                maxiter=cfg.trace_samples,
                min_samples=min(10, residual),
                seed=cfg.seed,
                method=method,
                estimator=cfg.trace_estimator,
            )
            label = "hessian-trace" + ("-pyhessian" if method == "pyhessian" else "")
            label += "-hutchpp" if cfg.trace_estimator == "hutch++" else ""
            tasks.append(ProbeTask(label, hessian_trace, {**kwargs, **graph}))
        if cfg.density:
            kwargs = dict(n_runs=cfg.density_runs, n_iter=cfg.density_iter, seed=cfg.seed, **graph)
            tasks.append(ProbeTask("hessian-density", hessian_density, kwargs))
    if cfg.landscape:
        from sharp.probes.landscape import parse_alphas, random_direction_scan

        alphas = parse_alphas(cfg.landscape_range)
        kwargs = dict(alphas=alphas, betas=alphas if cfg.landscape_2d else None, seed=cfg.seed)
        tasks.append(
            ProbeTask(f"landscape-{'2d' if cfg.landscape_2d else '1d'}", random_direction_scan, kwargs)
        )
    if cfg.noise_scale:
        from sharp.probes.noise import gradient_noise_scale

        pool = "training split" if cfg.noise_pool == "train" else "probe set"
        kwargs = dict(b_small=cfg.b_small, b_big=cfg.b_big, seed=cfg.seed, pool_name=pool)
        label = f"noise-scale-b{cfg.b_small}-{cfg.b_big}" + (
            "-probe-set" if cfg.noise_pool == "probe-set" else ""
        )
        tasks.append(ProbeTask(label, gradient_noise_scale, kwargs, pool=cfg.noise_pool == "train"))
    if cfg.norms:
        tasks.append(ProbeTask("weight-norms", run_weight_norms))

    return tasks


def _model_state(checkpoint: Any) -> Any:
    """The model's state dict in a loaded checkpoint (a bare state dict, or one under "model")."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"]
    return checkpoint


def run_weight_norms(
    model: nn.Module, batches: Batches, *, bn_mode: str, run: RunDir, **_: Any
) -> NormsResult:
    """`weight_norms` with the initial weights from the run's checkpoints/epoch-0000.pt; without that
    file (or with one that cannot be read) the distance from initialization is None, with the reason.
    The other probe settings (loss, BN data) do not enter: no weight norm evaluates the data."""
    from sharp.probes.norms import weight_norms

    path = run.epoch_checkpoint(0)
    if not path.exists():
        reason = f"{path} does not exist: train with --checkpoint-every K to keep the initial weights"
        return weight_norms(model, batches, init_missing=reason, bn_mode=bn_mode)
    try:
        state = _model_state(load_checkpoint(path))
    except SharpError as exc:
        return weight_norms(model, batches, init_missing=str(exc), bn_mode=bn_mode)
    return weight_norms(model, batches, init=state, init_source=str(path), bn_mode=bn_mode)


def _bn_arguments(
    cfg: ProbeConfig, data: RunData, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """bn_mode and, for recompute, the run's training split (or a seeded subset of it) to
    recompute from; for batch, the BN group size (--bn-batch, else the run's eval_batch)."""
    if cfg.bn_mode == "recompute":
        return {
            "bn_data": SplitBatches(
                data.loader("train", cfg.bn_set, cfg.probe_seed, device, dtype), cfg.probe_batch
            )
        }
    if cfg.bn_mode == "batch":
        size = cfg.bn_batch or data.settings.get("eval_batch") or data.derived.get("eval_batch")
        if size is None:
            raise SharpError("--bn-mode batch normalizes groups of N probe examples: give --bn-batch N")
        return {"bn_batch": int(size)}
    return {}


def run_probes(
    run_path: str | Path, tasks: list[ProbeTask], cfg: ProbeConfig, echo: Callable[[str], None] = print
) -> list[Path]:
    """Run each task on each checkpoint; write RUN/probes/CHECKPOINT.LABEL.KEY.json; skip existing ones.

    Every probe runs with the run's loss, under `runtime.torch_settings` (TF32 off unless
    --tf32, deterministic kernels if asked, --threads), the caller's flags restored after it.
    With --reparam-check ALPHA each task also runs at the rescaled weights of
    `sharp.probes.reparam.rescale` (file label LABEL-reparamALPHA) and both numbers are echoed.
    """
    data = RunData.open(run_path)
    dev = runtime.select_device(cfg.device)
    dtype = runtime.parameter_dtype(cfg.precision)
    loss = data.settings.get("loss", "ce")
    loss_fn = mean_loss(loss)
    loader = data.loader("train", cfg.probe_set, cfg.probe_seed, dev, dtype)
    batches = list(loader.batches(cfg.probe_batch))
    bn_kwargs = _bn_arguments(cfg, data, dev, dtype)
    pool = (
        LoaderPool(data.loader("train", None, cfg.probe_seed, dev, dtype))
        if any(t.pool for t in tasks)
        else None
    )
    context = {
        "probe_set": len(loader),
        "probe_seed": cfg.probe_seed,
        "probe_batch": cfg.probe_batch,
        "bn_mode": cfg.bn_mode,
        "bn_batch": bn_kwargs.get("bn_batch"),
        "bn_set": len(bn_kwargs["bn_data"]) if "bn_data" in bn_kwargs else None,
        "precision": cfg.precision,
        "loss": loss,
        "tf32": cfg.tf32,
        "deterministic": cfg.deterministic,
    }
    variants: list[tuple[str, float | None]] = [("", None)]
    if cfg.reparam_check is not None:
        variants.append((f"-reparam{cfg.reparam_check:g}", cfg.reparam_check))
    written = []
    for label, path in data.checkpoints(cfg.checkpoint):
        models: dict[float | None, tuple[nn.Module, str | None]] = {}
        for task in tasks:
            headlines = []
            for suffix, alpha in variants:
                variant = ProbeTask(task.label + suffix, task.func, task.kwargs, task.pool)
                out = probe_path(data.run, label, variant, context)
                if out.exists():
                    echo(f"skip {out.name}: already computed with these settings")
                    headlines.append(summarize(json.loads(out.read_text())))
                    continue
                if alpha not in models:
                    model = models[None][0] if None in models else data.load_model(path, dev, dtype)
                    models[alpha] = (model, None) if alpha is None else rescale(model, alpha)
                model, rule = models[alpha]
                parameters = inspect.signature(task.func).parameters
                extra: dict[str, Any] = {"progress": True} if "progress" in parameters else {}
                if "run" in parameters:  # a probe that reads the run directory (weight norms: epoch-0000.pt)
                    extra["run"] = data.run
                if task.pool:
                    extra["pool"] = pool
                with runtime.torch_settings(
                    dev, deterministic=cfg.deterministic, tf32=cfg.tf32, threads=cfg.threads
                ):
                    result = task.func(
                        model,
                        batches,
                        loss_fn=loss_fn,
                        bn_mode=cfg.bn_mode,
                        **bn_kwargs,
                        **extra,
                        **task.kwargs,
                    )
                record = result.to_dict()
                if alpha is not None:
                    record["reparam"] = {"alpha": alpha, "rule": rule, "reference": "Dinh et al. 2017"}
                record["provenance"] = {
                    "run": str(data.run.path),
                    "checkpoint": label,
                    "checkpoint_path": str(path),
                    "task": variant.label,
                    **context,
                    "probe_split": "train",
                    "augment": False,
                    "device": runtime.describe_device(dev),
                    "sharp": __version__,
                    "torch": torch.__version__,
                }
                atomic_write_json(out, record)
                written.append(out)
                headlines.append(summarize(record))
                echo(f"wrote {out}: {headlines[-1]}")
            if cfg.reparam_check is not None:
                echo(
                    f"reparam-check {task.label} at {label}: original {headlines[0]} | "
                    f"rescaled by {cfg.reparam_check:g}: {headlines[1]}"
                )
    return written


def summarize(record: dict[str, Any]) -> str:
    """The headline number(s) of a probe record, for the terminal."""
    from analysis.headline import headlines

    parts = []
    for h in headlines(record):
        if isinstance(h.value, list):
            text = ", ".join(f"{v:.4g}" for v in h.value)
        else:
            text = "—" if h.value is None else f"{h.value:.4g}"
        parts.append(f"{h.field} {text}" + ("" if h.stderr is None else f" ± {h.stderr:.2g}"))
    if parts:
        return "; ".join(parts)
    if "loss" in record and isinstance(record["loss"], list):
        return f"{len(record['loss'])} points"
    return record.get("probe", "")


def run_interpolation(
    run_a: str | Path,
    run_b: str | Path,
    *,
    alphas: str = "-1:2:25",
    bn: str = "recompute",
    path: str = "line",
    bn_batch: int | None = None,
    bn_set: int | None = None,
    checkpoint: str = "final",
    train_set: int = 2048,
    test_set: int | None = None,
    seed: int = 0,
    device: str = "auto",
    precision: str = "fp32",
    out: str | Path,
    overwrite: bool = False,
) -> list[Path]:
    """Keskar's interpolation between two runs (Fig. 3 line, Fig. 7 sine path): interp.json,
    interp.csv and interp.png in `out`.

    With bn="recompute" the statistics at each alpha are recomputed from RUN_A's whole
    training split (or a seeded subset of `bn_set` examples); with bn="batch", in BN groups
    of `bn_batch` (default: the run's eval_batch). The run's loss is used; TF32 is off.
    """
    from analysis.interpolation import plot_interpolation
    from analysis.results import dataset_text
    from sharp.probes.landscape import interpolate, parse_alphas

    out = Path(out)
    if (out / "interp.json").exists() and not overwrite:
        raise SharpError(
            f"{out / 'interp.json'} exists; pass --overwrite to replace it or choose another --out"
        )
    grid = parse_alphas(alphas)
    first = RunData.open(run_a)
    second = RunData.open(run_b, dataset=first.dataset)
    for key in ("dataset", "model", "width", "norm", "train_subset", "data_seed", "loss"):
        if first.settings.get(key) != second.settings.get(key):
            raise SharpError(
                f"the runs differ in {key} ({first.settings.get(key)!r} vs {second.settings.get(key)!r}): "
                "interpolate between runs of one model on one dataset"
            )
    if bn_set is not None and bn != "recompute":
        raise SharpError("--bn-set chooses the examples of --bn recompute: use it with --bn recompute")
    if bn == "batch" and bn_batch is None:
        bn_batch = first.settings.get("eval_batch")
        if bn_batch is None:
            raise SharpError("--bn batch normalizes groups of N examples: give --bn-batch N")
    dev, dtype = runtime.select_device(device), runtime.parameter_dtype(precision)
    loss = first.settings.get("loss", "ce")
    model_a = first.load_model(first.checkpoints(checkpoint)[0][1], dev, dtype)
    model_b = second.load_model(second.checkpoints(checkpoint)[0][1], dev, dtype)
    batch = 512
    train_batches = list(first.loader("train", train_set, seed, dev, dtype).batches(batch))
    test_batches = list(first.loader("test", test_set, seed, dev, dtype).batches(batch))
    bn_data = (
        SplitBatches(first.loader("train", bn_set, seed, dev, dtype), batch) if bn == "recompute" else None
    )
    with runtime.torch_settings(dev, tf32=False):
        result = interpolate(
            model_a,
            model_b,
            train_batches,
            test_batches,
            grid,
            bn=bn,
            loss_fn=mean_loss(loss),
            bn_data=bn_data,
            bn_batch=bn_batch,
            path=path,
            progress=True,
        )
    record = result.to_dict()
    record["provenance"] = {
        "run_a": str(first.run.path),
        "run_b": str(second.run.path),
        "checkpoint": checkpoint,
        "train_set": sum(len(t) for _, t in train_batches),
        "test_set": sum(len(t) for _, t in test_batches),
        "bn_set": len(bn_data) if bn_data is not None else None,
        "seed": seed,
        "precision": precision,
        "device": runtime.describe_device(dev),
        "loss": loss,
        "sharp": __version__,
        "torch": torch.__version__,
        "batch_size_a": first.settings["batch_size"],
        "batch_size_b": second.settings["batch_size"],
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "interp.json", record)
    s = first.settings
    title = (
        f"Keskar et al. {'Fig. 7' if path == 'sin' else 'Fig. 3'} — {dataset_text(s, first.derived)}, "
        f"{s['model']}, B={s['batch_size']} vs B={second.settings['batch_size']}, BN: {bn}"
        + (", sine path" if path == "sin" else "")
    )
    plot_interpolation(record, out / "interp.png", out / "interp.csv", title=title)
    return [out / "interp.json", out / "interp.csv", out / "interp.png"]
