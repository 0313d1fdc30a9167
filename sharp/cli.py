"""The `sharp` command: parse, validate, call the library. No logic of its own."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sharp.config import (
    BN_MODES,
    ProbeConfig,
    TrainConfig,
    check_choice,
    check_positive,
    field_types,
    make_config,
    option_name,
    read_config_file,
    resolve_settings,
)
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


def settings_options(cls: type, names: tuple[str, ...] | None = None) -> Callable[[Callable], Callable]:
    """One click option per field of a settings dataclass (or per field in `names`), all
    defaulting to None ("not given"): `make_config` fills a whole config from them, and
    `resolve_settings(cls, **values)` a command's few."""
    types = field_types(cls)

    def decorate(func: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            if names is not None and f.name not in names:
                continue
            kind = types[f.name][0]
            help_text = f.metadata["help"]
            if f.metadata.get("choices"):
                help_text += f" [{'|'.join(f.metadata['choices'])}]"
            if f.default is not None and (kind is not bool or f.default):
                help_text += f" (default: {f.default})"
            flag = option_name(f.name)
            if kind is bool:
                func = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)(func)
            else:
                kind = f.metadata.get("parse") or kind  # a parser of its own (--batch-size full)
                func = click.option(flag, f.name, type=kind, default=None, help=help_text)(func)
        return func

    return decorate


@click.group(
    cls=SharpGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(package_name="sharp", prog_name="sharp")
def cli() -> None:
    """Train small- and large-batch models and measure how sharp their minima are."""


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
    help="continue the run in this directory from checkpoints/last.pt (from step 0 if it has none)",
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
    from sharp.distributed import Distributed, launch_torchrun
    from sharp.runs import default_run_dir, plan_resume
    from sharp.train import train as run_training

    resume = False
    if resume_dir:
        if config_file or out or overwrite:
            raise SharpError("--resume takes the run's own settings: drop --config, --out and --overwrite")
        plan = plan_resume(resume_dir, settings)
        cfg, out_path = plan.config, Path(resume_dir)
        resume, overwrite = plan.from_checkpoint, not plan.from_checkpoint  # no checkpoint: from step 0
    else:
        cfg = make_config(read_config_file(config_file) if config_file else {}, settings)
        out_path = Path(out) if out else default_run_dir(cfg)
    if nproc is not None:
        check_positive(nproc=nproc)
        if nproc > 1:
            return launch_torchrun(
                nproc, cfg.to_dict(), out_path, overwrite=overwrite, resume=resume, quiet=quiet
            )
    try:
        last = run_training(cfg, out_path, overwrite=overwrite, resume=resume, progress_bar=not quiet)
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
            "--landscape, --noise-scale or --norms"
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
    "--path",
    "path_kind",
    default="line",
    show_default=True,
    help="line: (1-alpha) RUN_A + alpha RUN_B (Fig. 3); sin: cos(alpha pi/2) RUN_A + sin(alpha pi/2) "
    "RUN_B (Fig. 7)",
)
@click.option(
    "--bn",
    default="recompute",
    show_default=True,
    help="BN at each alpha: recompute (from the training split), interpolate (variances in log space), "
    "a (RUN_A's), or batch (statistics of each group of --bn-batch examples)",
)
@click.option(
    "--bn-batch", type=int, default=None, help="--bn batch: examples per BN group (default: eval_batch)"
)
@click.option(
    "--bn-set",
    type=int,
    default=None,
    help="--bn recompute: a seeded subset of N training examples (default: all)",
)
@click.option("--checkpoint", default="final", show_default=True, help="checkpoint of both runs")
@click.option(
    "--train-set",
    type=int,
    default=2048,
    show_default=True,
    help="seeded training subset evaluated",
)
@click.option("--test-set", type=int, default=None, help="seeded test subset (default: the whole test split)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the subsets")
@settings_options(ProbeConfig, names=("device", "precision"))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="directory for interp.json/.csv/.png"
)
@click.option("--overwrite", is_flag=True, help="replace an existing interp.json in --out")
def interp(
    run_a: str,
    run_b: str,
    alphas: str,
    path_kind: str,
    bn: str,
    bn_batch: int | None,
    bn_set: int | None,
    checkpoint: str,
    train_set: int,
    test_set: int | None,
    seed: int,
    device: str | None,
    precision: str | None,
    out: str,
    overwrite: bool,
) -> None:
    """Loss and accuracy along the path from RUN_A (alpha 0) to RUN_B (alpha 1) (Keskar et al., Fig. 3/7)."""
    from sharp.probe_runs import run_interpolation
    from sharp.probes.landscape import BN_BUFFER_MODES, PATHS

    check_positive(train_set=train_set, test_set=test_set, bn_set=bn_set)
    check_choice(bn, "--bn", BN_BUFFER_MODES)
    check_choice(path_kind, "--path", PATHS)
    runtime = resolve_settings(ProbeConfig, device=device, precision=precision)
    if bn_batch is not None and (bn != "batch" or bn_batch < 2):
        raise SharpError(
            f"--bn-batch {bn_batch} sets the BN groups of --bn batch: use it with --bn batch, >= 2"
        )
    paths = run_interpolation(
        run_a,
        run_b,
        alphas=alphas,
        bn=bn,
        path=path_kind,
        bn_batch=bn_batch,
        bn_set=bn_set,
        checkpoint=checkpoint,
        train_set=train_set,
        test_set=test_set,
        seed=seed,
        device=runtime["device"],
        precision=runtime["precision"],
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
    from sharp.sweep import SweepSpec, run_sweep, summary

    line, code = summary(run_sweep(SweepSpec.from_toml(spec), out, launcher, echo=click.echo))
    click.echo(f"sweep {out}: {line}")
    return code


@sweep.command("status")
@click.argument("directory", type=click.Path(file_okay=False))
def sweep_status(directory: str) -> None:
    """A table of the sweep's runs: varying settings, state, test accuracy, probes done."""
    from sharp.sweep import collect, status_table

    for line in status_table(collect(directory)):
        click.echo(line)


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


@cli.command()
@click.argument("name")
@click.option(
    "--scale", default="cpu", show_default=True, help="cpu (reduced, ~30 min on 2 cores) or full (paper)"
)
@click.option("--out", type=click.Path(file_okay=False), help="output directory (default: repro/NAME-SCALE)")
@click.option("--dataset", default=None, help="override the spec's dataset, e.g. folder:/data/cifar10-jpeg")
@click.option("--data-root", default=None, help="where cifar10/cifar100 live")
@click.option("--download", is_flag=True, default=None, help="download cifar10/cifar100 if missing")
@settings_options(TrainConfig, names=("device",))
@launcher_options
def repro(
    name: str,
    scale: str,
    out: str | None,
    dataset: str | None,
    data_root: str | None,
    download: bool | None,
    device: str | None,
    launcher: Any,
) -> None:
    """Reproduce a paper result from paper_repro/NAME.toml: runs, probes, figures, report."""
    from sharp.repro import ReproSpec, run_repro

    device = resolve_settings(TrainConfig, device=device)["device"]
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
@click.option(
    "--bn-mode",
    default=None,
    help="only the probes measured in this BN mode [eval|recompute|batch] (default: all, side by side)",
)
def report(
    runs: tuple[str, ...],
    out: str,
    scale: str | None,
    title: str | None,
    interpolations: tuple[str, ...],
    goal_losses: tuple[float, ...],
    figures: tuple[str, ...],
    bn_mode: str | None,
) -> None:
    """Tables, figures and settings of run directories (or sweep / repro folders) as report.md."""
    from analysis.report import build_report, check_figure_names
    from analysis.results import load_runs
    from analysis.tables import BN_MODE_TEXT, with_bn_mode
    from sharp.repro import SCALES

    if scale is not None:
        check_choice(scale, "--scale", SCALES)
    if bn_mode is not None:
        check_choice(bn_mode, "--bn-mode", BN_MODES)
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
    notes = []
    if bn_mode is not None:
        records = with_bn_mode(records, bn_mode)
        notes.append(
            f"Probe numbers: only those measured with {BN_MODE_TEXT[bn_mode]} (`--bn-mode {bn_mode}`)."
        )
    path = build_report(
        records,
        out,
        scale=scale,
        title=title,
        interpolations=interpolations,
        notes=notes,
        goal_losses=list(goal_losses) or None,
        figures=list(figures) or None,
    )
    click.echo(f"report: {path}")


@cli.command("correlate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="directory for per_run.csv, correlation.csv, correlation.md and the figures",
)
@click.option(
    "--bootstrap",
    "n_resamples",
    type=int,
    default=1000,
    show_default=True,
    help="resamples of the runs behind each τ's 95% interval",
)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the bootstrap")
@click.option(
    "--all-runs", is_flag=True, help="also compare finished runs that did not reach their until_train_loss"
)
@click.option("--scale", default=None, help="cpu or full, named in the figures")
@click.option("--title", default=None, help="title of correlation.md")
def correlate_command(
    paths: tuple[str, ...],
    out: str,
    n_resamples: int,
    seed: int,
    all_runs: bool,
    scale: str | None,
    title: str | None,
) -> None:
    """Rank-correlate every probed measure with the generalization gap over the runs of sweeps,
    reproductions or run directories (Kendall's τ and Jiang et al. 2020's granulated τ)."""
    from analysis.correlate import correlate, load_study, notes, write_correlation
    from sharp.repro import SCALES

    check_positive(bootstrap=n_resamples)
    if scale is not None:
        check_choice(scale, "--scale", SCALES)
    result = correlate(load_study(paths), n_resamples=n_resamples, seed=seed, all_runs=all_runs)
    for note in notes(result):
        click.echo(f"sharp: left out: {note[2:]}", err=True)
    written = write_correlation(result, out, scale=scale, title=title)
    click.echo(f"wrote {written[0]}: {len(result.rows)} runs, {len(result.measures)} measures")
