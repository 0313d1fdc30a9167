"""The `sharp` command: parse, validate, call the library. No logic of its own."""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sharp.config import ProbeConfig, TrainConfig, make_config, option_name, read_config_file
from sharp.errors import Interrupted, SharpError


class SharpGroup(click.Group):
    """A click group whose errors are one line on stderr and an exit code, never a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("sharp: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"sharp: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except Interrupted as exc:
            click.echo(f"sharp: {exc}", err=True)
            sys.exit(exc.exit_code)
        except SharpError as exc:
            click.echo(f"sharp: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(result if isinstance(result, int) else 0)


def settings_options(cls: type) -> Callable[[Callable], Callable]:
    """One click option per field of a settings dataclass, all defaulting to None ("not given")."""
    types = {"int": int, "float": float, "str": str}

    def decorate(func: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            annotation = str(f.type).split(" ")[0]
            help_text = f.metadata["help"]
            if f.metadata.get("choices"):
                help_text += f" [{'|'.join(f.metadata['choices'])}]"
            if f.default is not None and (annotation != "bool" or f.default):
                help_text += f" (default: {f.default})"
            flag = option_name(f.name)
            if annotation == "bool":
                func = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)(func)
            else:
                func = click.option(flag, f.name, type=types[annotation], default=None, help=help_text)(func)
        return func

    return decorate


@click.group(
    cls=SharpGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(package_name="sharp", prog_name="sharp")
def cli() -> None:
    """Train small- and large-batch models and measure how sharp their minima are."""


def default_out(cfg: TrainConfig) -> Path:
    dataset = re.sub(r"[^A-Za-z0-9]+", "-", Path(cfg.dataset.replace("folder:", "")).name or cfg.dataset)
    return Path("runs") / f"{dataset}-{cfg.model}-B{cfg.batch_size}-seed{cfg.seed}"


def _resume_config(run_path: Path, given: dict[str, Any]) -> TrainConfig:
    from sharp.runs import RunDir

    run = RunDir(run_path)
    stored = run.read_config()["settings"]
    run.refuse_if_written()
    state = run.status().get("state")
    if state == "finished":
        raise SharpError(f"--resume {run_path}: the run already finished; nothing to continue")
    if not run.last_checkpoint.exists():
        hint = (
            f"fall back to {run.previous_checkpoint} (move it to last.pt)"
            if run.previous_checkpoint.exists()
            else "start it again with --overwrite"
        )
        raise SharpError(f"--resume {run_path}: no checkpoints/last.pt to continue from; {hint}")
    for name, value in given.items():
        if value is not None and stored.get(name) != value:
            raise SharpError(
                f"{option_name(name)} {value} conflicts with the run's {name} = {stored.get(name)!r}: "
                "a resumed run keeps its settings, so drop the option"
            )
    return make_config(stored, {})


@cli.command()
@settings_options(TrainConfig)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="TOML (or a run's config.json) supplying any setting; the command line overrides it",
)
@click.option("--out", type=click.Path(file_okay=False), help="run directory (default: runs/NAME)")
@click.option("--overwrite", is_flag=True, help="replace a run already in --out")
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False),
    help="continue the run in this directory from checkpoints/last.pt",
)
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option(
    "--nproc", type=int, default=None, help="train across N processes on this machine (torchrun, DDP)"
)
def train(
    config_file: str | None,
    out: str | None,
    overwrite: bool,
    resume_dir: str | None,
    quiet: bool,
    nproc: int | None,
    **settings: Any,
) -> int | None:
    """Train one model into a run directory."""
    from sharp.distributed import Distributed
    from sharp.train import train as run_training

    if resume_dir:
        if config_file or out or overwrite:
            raise SharpError("--resume takes the run's own settings: drop --config, --out and --overwrite")
        cfg = _resume_config(Path(resume_dir), settings)
        out_path = Path(resume_dir)
    else:
        cfg = make_config(read_config_file(config_file) if config_file else {}, settings)
        out_path = Path(out) if out else default_out(cfg)
    if nproc is not None:
        _check_positive(nproc=nproc)
        if nproc > 1:
            return _launch_torchrun(nproc, cfg, out_path, overwrite, bool(resume_dir), quiet)
    try:
        last = run_training(
            cfg, out_path, overwrite=overwrite, resume=bool(resume_dir), progress_bar=not quiet
        )
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; checkpoint saved: continue with `sharp train --resume {out_path}`"
        ) from None
    if not Distributed.from_env().is_main:
        return None
    click.echo(
        f"finished {out_path}: step {last['step']}, test accuracy {last['test_acc']:.4f}, "
        f"test loss {last['test_loss']:.4f}, training loss {last['eval_train_loss']:.4f}"
    )


def main() -> None:
    cli.main(prog_name="sharp")


def _check_positive(**values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise SharpError(f"--{name.replace('_', '-')} {value} must be positive")


def _choice(value: str, option: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SharpError(f"{option} {value!r} is unknown: choose one of {', '.join(choices)}")
    return value


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@settings_options(ProbeConfig)
def probe(run: str, **settings: Any) -> None:
    """Measure a run's solution(s); results go to RUN/probes/*.json, one per probe and checkpoint."""
    from sharp.probe_runs import probe_tasks, run_probes

    cfg = make_config({}, settings, ProbeConfig)
    if not cfg.any_probe():
        raise SharpError(
            "choose at least one probe: --sharpness, --adaptive, --average, --hessian, --trace, --density, "
            "--landscape or --noise-scale"
        )
    run_probes(run, probe_tasks(cfg), cfg, echo=click.echo)


@cli.command()
@click.argument("run_a", type=click.Path(file_okay=False))
@click.argument("run_b", type=click.Path(file_okay=False))
@click.option(
    "--alphas",
    default="-1:2:25",
    show_default=True,
    help="start:stop:count (or a comma list) of alpha; 0 is RUN_A, 1 is RUN_B",
)
@click.option(
    "--bn",
    default="recompute",
    show_default=True,
    help="BN buffers at each alpha: recompute (on training data), interpolate, or a (RUN_A's)",
)
@click.option("--checkpoint", default="final", show_default=True, help="checkpoint of both runs")
@click.option(
    "--train-set",
    type=int,
    default=2048,
    show_default=True,
    help="seeded training subset evaluated (and used to recompute BN)",
)
@click.option("--test-set", type=int, default=None, help="seeded test subset (default: the whole test split)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the subsets")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
@click.option("--precision", default="fp32", show_default=True, help="fp32 or fp64")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="directory for interp.json/.csv/.png"
)
@click.option("--overwrite", is_flag=True, help="replace an existing interp.json in --out")
def interp(
    run_a: str,
    run_b: str,
    alphas: str,
    bn: str,
    checkpoint: str,
    train_set: int,
    test_set: int | None,
    seed: int,
    device: str,
    precision: str,
    out: str,
    overwrite: bool,
) -> None:
    """Loss and accuracy along (1-alpha)*RUN_A + alpha*RUN_B (Keskar et al., Fig. 3)."""
    from sharp.probe_runs import run_interpolation

    _check_positive(train_set=train_set, test_set=test_set)
    _choice(bn, "--bn", ("recompute", "interpolate", "a"))
    _choice(precision, "--precision", ("fp32", "fp64"))
    paths = run_interpolation(
        run_a,
        run_b,
        alphas=alphas,
        bn=bn,
        checkpoint=checkpoint,
        train_set=train_set,
        test_set=test_set,
        seed=seed,
        device=device,
        precision=precision,
        out=out,
        overwrite=overwrite,
    )
    click.echo("wrote " + ", ".join(str(p) for p in paths))


class SweepGroup(click.Group):
    """`sharp sweep SPEC ...` runs a sweep; `sharp sweep status|collect DIR` read one."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=SweepGroup)
def sweep() -> None:
    """Grids of runs from a TOML spec: `sharp sweep SPEC --out DIR`, then `status` / `collect`."""


def launcher_options(func: Callable) -> Callable:
    """--launcher, --workers, --ray-address, --gpus-per-run, --cpus-per-run, --ensemble, gathered into
    `launcher`."""
    options = [
        click.option("--launcher", "kind", default="local", show_default=True, help="local or ray"),
        click.option(
            "--workers", type=int, default=1, show_default=True, help="local: runs at once (processes)"
        ),
        click.option(
            "--ray-address", default=None, help="ray: an existing cluster (default: start a local one)"
        ),
        click.option(
            "--gpus-per-run",
            type=float,
            default=0.0,
            show_default=True,
            help="ray: GPUs per run (fractions ok)",
        ),
        click.option("--cpus-per-run", type=float, default=1.0, show_default=True, help="ray: CPUs per run"),
        click.option(
            "--ensemble",
            type=int,
            default=None,
            help="train runs that share model, data and batch sizes as ensembles of up to K, one job each "
            "(default 1; repro: the spec's)",
        ),
    ]

    @functools.wraps(func)
    def wrapper(
        *args: Any,
        kind: str,
        workers: int,
        ray_address: str | None,
        gpus_per_run: float,
        cpus_per_run: float,
        ensemble: int | None,
        **kwargs: Any,
    ) -> Any:
        from sharp.sweep import Launcher

        launcher = Launcher(kind, workers, ray_address, gpus_per_run, cpus_per_run, ensemble)
        return func(*args, launcher=launcher, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@sweep.command("run")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="sweep directory")
@launcher_options
def sweep_run(spec: str, out: str, launcher: Any) -> int:
    """Train (and probe) every run of SPEC not finished yet; a re-run resumes unfinished runs."""
    from sharp.sweep import SweepSpec, run_sweep

    states = run_sweep(SweepSpec.from_toml(spec), out, launcher, echo=click.echo)
    order = ("finished", "diverged", "failed")
    counts = {s: n for s in order if (n := list(states.values()).count(s))}
    click.echo(f"sweep {out}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 1 if "failed" in counts else 0


@sweep.command("status")
@click.argument("directory", type=click.Path(file_okay=False))
def sweep_status(directory: str) -> None:
    """A table of the sweep's runs: varying settings, state, test accuracy, probes done."""
    from sharp.sweep import collect

    rows = collect(directory)
    keys = [k for k in rows[0] if k not in ("run", "state", "probes", "reason")] if rows else []
    varying = [
        k
        for k in keys
        if "." not in k
        and k not in ("step", "epoch", "test_loss", "eval_train_acc", "eval_train_loss", "test_acc")
    ]
    header = ["run", *varying, "state", "test_acc", "probes"]
    table = [header] + [
        [str(row.get(k, "")) if k != "test_acc" or row.get(k) is None else f"{row[k]:.4f}" for k in header]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


@sweep.command("collect")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--csv", "csv_path", required=True, type=click.Path(dir_okay=False), help="output CSV file")
def sweep_collect(directory: str, csv_path: str) -> None:
    """One CSV row per run: settings that vary, final metrics and probe results."""
    from analysis.style import write_csv
    from sharp.sweep import collect

    rows = collect(directory)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    write_csv(csv_path, columns, [[row.get(k, "") for k in columns] for row in rows])
    click.echo(f"wrote {csv_path}: {len(rows)} runs, {len(columns)} columns")


def _launch_torchrun(
    nproc: int, cfg: TrainConfig, out: Path, overwrite: bool, resume: bool, quiet: bool
) -> int:
    """`sharp train --nproc N` = `torchrun --standalone --nproc_per_node N -m sharp train ...`."""
    import json
    import os
    import subprocess
    import tempfile

    if "WORLD_SIZE" in os.environ:
        raise SharpError("--nproc is for launching; under torchrun already, drop it")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "sharp",
        "train",
    ]
    with tempfile.TemporaryDirectory() as folder:
        if resume:
            command += ["--resume", str(out)]
        else:
            settings = Path(folder) / "settings.json"
            settings.write_text(json.dumps({"settings": cfg.to_dict()}))
            command += ["--config", str(settings), "--out", str(out)] + (["--overwrite"] if overwrite else [])
        command += ["--quiet"] if quiet else []
        return subprocess.call(command)


@cli.command()
@click.argument("name")
@click.option(
    "--scale", default="cpu", show_default=True, help="cpu (reduced, ~30 min on 2 cores) or full (paper)"
)
@click.option("--out", type=click.Path(file_okay=False), help="output directory (default: repro/NAME-SCALE)")
@click.option("--dataset", default=None, help="override the spec's dataset, e.g. folder:/data/cifar10-jpeg")
@click.option("--data-root", default=None, help="where cifar10/cifar100 live")
@click.option("--download", is_flag=True, default=None, help="download cifar10/cifar100 if missing")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
@launcher_options
def repro(
    name: str,
    scale: str,
    out: str | None,
    dataset: str | None,
    data_root: str | None,
    download: bool | None,
    device: str,
    launcher: Any,
) -> None:
    """Reproduce a paper result from paper_repro/NAME.toml: runs, probes, figures, report."""
    from sharp.repro import ReproSpec, run_repro

    _choice(device, "--device", ("auto", "cpu", "cuda"))
    overrides = {
        k: v
        for k, v in (("dataset", dataset), ("data_root", data_root), ("download", download))
        if v is not None
    }
    spec = ReproSpec.load(name, scale, overrides)
    target = Path(out) if out else Path("repro") / f"{spec.name}-{scale}"
    report = run_repro(spec, target, launcher, device=device, echo=click.echo)
    click.echo(f"report: {report}")


@cli.command()
@click.option(
    "--out",
    default="runs/demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="output directory (a re-run skips what is done)",
)
@click.option("--quick", is_flag=True, help="a seconds-long version (2 epochs, fewer probes)")
def demo(out: str, quick: bool) -> None:
    """Small- vs large-batch ResNet-8 on the bundled digits: train, probe, interpolate, report."""
    from sharp.demo import run_demo

    headline = run_demo(out, quick=quick, echo=click.echo)

    def number(key: str, percent: bool = False) -> str:
        value = headline.get(key)
        if value is None:
            return "—"
        return f"{100 * value:.1f}%" if percent else f"{value:.3g}"

    click.echo(f"test accuracy  SB {number('test_acc_sb', True)}  LB {number('test_acc_lb', True)}")
    click.echo(
        f"eps-sharpness (eps 1e-3, full space)  SB {number('sharpness_sb')}  LB {number('sharpness_lb')}"
    )
    click.echo(f"top Hessian eigenvalue  SB {number('lambda_max_sb')}  LB {number('lambda_max_lb')}")
    click.echo(f"report: {headline['report']}")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="directory for report.md and figures/"
)
@click.option("--scale", default=None, help="cpu or full, named in every caption")
@click.option("--title", default=None, help="the report's title")
@click.option(
    "--interp",
    "interpolations",
    multiple=True,
    type=click.Path(),
    help="an interp.json (or its folder) from `sharp interp` to include; repeatable",
)
@click.option(
    "--goal-loss",
    "goal_losses",
    multiple=True,
    type=float,
    help="goal training loss of the steps-vs-examples fit; repeatable",
)
@click.option(
    "--figure",
    "figures",
    multiple=True,
    help="draw only this figure (keskar_fig4, interpolation, hessian_density, ...); repeatable",
)
def report(
    runs: tuple[str, ...],
    out: str,
    scale: str | None,
    title: str | None,
    interpolations: tuple[str, ...],
    goal_losses: tuple[float, ...],
    figures: tuple[str, ...],
) -> None:
    """Tables, figures and settings of run directories (or sweep / repro folders) as report.md."""
    from analysis.report import build_report, check_figure_names
    from analysis.results import load_runs

    if scale is not None:
        _choice(scale, "--scale", ("cpu", "full"))
    try:
        check_figure_names(figures)
    except SharpError as exc:
        raise SharpError(f"--figure: {exc}") from None
    for path in (*runs, *interpolations):
        if not Path(path).exists():
            raise SharpError(f"{path} does not exist; give run directories or folders holding them")
    try:
        records = load_runs(runs)
    except ValueError as exc:
        raise SharpError(str(exc)) from None
    if not records:
        raise SharpError(
            f"no run directories found in {', '.join(runs)}; give directories made by sharp train"
        )
    path = build_report(
        records,
        out,
        scale=scale,
        title=title,
        interpolations=interpolations,
        goal_losses=list(goal_losses) or None,
        figures=list(figures) or None,
    )
    click.echo(f"report: {path}")
