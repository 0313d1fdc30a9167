"""Grids of runs: a TOML spec, its expansion into runs with stable names, and launchers.

A spec has a `[base]` table of `sharp train` settings, an `[axes]` table of lists whose
product is the grid (a key naming several settings, `"batch_size,micro_batch" = [[64, 64],
[1000, 1000]]`, varies them together), and an optional `[probe]` table of `sharp probe` settings run after
each training run. Each run lives in `SWEEP/runs/NAME`, where NAME is a readable prefix of
the varying settings plus a hash of all resolved settings: the same settings always land in
the same directory, so a finished run is skipped and an unfinished one resumes from its
checkpoint when the sweep is run again. Results are read from the run directories, never
from the launcher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import signal
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import active_children, get_context
from pathlib import Path
from typing import Any

from sharp.config import ProbeConfig, TrainConfig, check_choice, make_config, read_table
from sharp.errors import Interrupted, SharpError
from sharp.fileio import atomic_write_json, read_json
from sharp.signals import StopSignals, listen_as_pool_worker, pool_worker_stop_asked

SHORT_NAMES = {
    "batch_size": "B",
    "micro_batch": "b",
    "bn_batch": "g",
    "base_lr": "blr",
    "lr": "lr",
    "seed": "s",
    "model": "",
    "optimizer": "",
    "weight_decay": "wd",
    "momentum": "m",
    "epochs": "ep",
    "train_subset": "n",
}


@dataclass
class SweepSpec:
    """A parsed sweep spec."""

    name: str
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    probe: dict[str, Any] | None

    @classmethod
    def from_toml(cls, path: str | Path) -> SweepSpec:
        return cls.from_dict(read_table(path, "sweep spec"), default_name=Path(path).stem)

    @classmethod
    def from_dict(cls, data: dict[str, Any], default_name: str = "sweep") -> SweepSpec:
        unknown = sorted(set(data) - {"name", "base", "axes", "probe"})
        if unknown:
            raise SharpError(f"sweep spec: unknown table {unknown[0]!r}; use [base], [axes] and [probe]")
        axes = data.get("axes", {})
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                raise SharpError(f"sweep spec: axes.{key} must be a non-empty list, e.g. {key} = [32, 128]")
            width = len(key.split(","))
            if width > 1 and any(not isinstance(v, list) or len(v) != width for v in values):
                raise SharpError(
                    f'sweep spec: axes."{key}" links {width} settings: give lists of {width} values, '
                    "e.g. [[256, 256], [5000, 5000]]"
                )
        spec = cls(str(data.get("name", default_name)), dict(data.get("base", {})), axes, data.get("probe"))
        spec.runs()  # validate every point before any work
        if spec.probe is not None:
            make_config(spec.probe, {}, ProbeConfig)
        return spec

    def runs(self) -> list[RunSpec]:
        """Every point of the grid, in order, with its resolved settings and directory name."""
        keys = list(self.axes)
        runs = []
        for values in itertools.product(*(self.axes[k] for k in keys)):
            point: dict[str, Any] = {}
            for key, value in zip(keys, values, strict=True):
                names = [k.strip() for k in key.split(",")]
                point.update(zip(names, value if len(names) > 1 else [value], strict=True))
            settings = make_config(self.base, point, TrainConfig).to_dict()
            runs.append(RunSpec(run_name(point, settings), settings, point))
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise SharpError("sweep spec: two grid points resolve to the same settings; remove the duplicate")
        return runs


@dataclass
class RunSpec:
    name: str
    settings: dict[str, Any]
    point: dict[str, Any]  # the values of the axes at this run


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def run_name(point: dict[str, Any], settings: dict[str, Any]) -> str:
    """`B128-blr0.01-s0-1a2b3c4d`: the varying settings, readable, then the settings hash."""
    parts = []
    for key, value in point.items():
        short = SHORT_NAMES.get(key, key.replace("_", ""))
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{short}{text}")
    prefix = "-".join(parts).replace("/", "_").replace(":", "_")
    return f"{prefix}-{settings_hash(settings)}" if prefix else settings_hash(settings)


def execute_run(run_dir: str | list[str], settings: Any, probes: Any = None) -> str:
    """Train (or resume) one run and run each probe table on it; return its final state. Never raises.

    A run is resumed by the resume policy of `sharp train --resume` (`runs.plan_resume`): from
    its last checkpoint, or from step 0 if it was stopped before its first. A run another live
    process is writing is left alone (`busy`). An ensemble's job (lists of run directories,
    settings and probes) goes to `execute_ensemble`.
    """
    if isinstance(run_dir, list):
        from sharp.ensemble import execute_ensemble

        return execute_ensemble(run_dir, settings, probes)
    from sharp.errors import RunDiverged
    from sharp.runs import RunDir, RunLocked, plan_resume
    from sharp.train import train

    run = RunDir(run_dir)
    try:
        state = run.status().get("state") if run.is_run() else None
        if state == "diverged":
            return "diverged"
        if state != "finished":
            resume = run.is_run() and plan_resume(run_dir).from_checkpoint
            cfg = make_config(settings, {}, TrainConfig)
            train(cfg, run_dir, resume=resume, overwrite=not resume, progress_bar=False)
        if probes:
            from sharp.probe_runs import probe_tasks, run_probes

            for probe in probes:
                probe_cfg = make_config(probe, {}, ProbeConfig)
                run_probes(run_dir, probe_tasks(probe_cfg), probe_cfg, echo=lambda _: None)
        return "finished"
    except RunDiverged:
        return "diverged"
    except RunLocked:
        return "busy"
    except KeyboardInterrupt:  # stopped by a signal: the run recorded it (interrupted) with its checkpoint
        raise
    except BaseException as exc:  # one failing run must not stop the sweep
        run.set_status("failed", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return "failed"


def prepare_sweep(spec: SweepSpec, out: str | Path) -> tuple[Path, list[RunSpec]]:
    """Write SWEEP/sweep.json (the spec and its runs); refuse a directory holding another sweep."""
    out = Path(out)
    runs = spec.runs()
    manifest = out / "sweep.json"
    record = {
        "name": spec.name,
        "base": spec.base,
        "axes": spec.axes,
        "probe": spec.probe,
        "runs": [{"name": r.name, "point": r.point} for r in runs],
    }
    if manifest.exists():
        existing = json.loads(manifest.read_text())
        if {k: existing.get(k) for k in ("base", "axes", "probe")} != {
            k: record[k] for k in ("base", "axes", "probe")
        }:
            raise SharpError(
                f"{out} holds a different sweep ({existing.get('name')}); choose another --out for this spec"
            )
    (out / "runs").mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, record)
    return out, runs


@dataclass(frozen=True)
class Launcher:
    """Where runs execute: `local` (in turn, or `workers` processes) or `ray` (one task per run,
    on the cluster at `ray_address`, or a local Ray started for the purpose); with `ensemble`
    K > 1, runs that can share train as ensembles of up to K (`sharp.ensemble`), one job each
    (None: not asked, every run alone; `sharp repro` then takes its spec's `ensemble`)."""

    kind: str = "local"
    workers: int = 1
    ray_address: str | None = None
    gpus_per_run: float = 0.0
    cpus_per_run: float = 1.0
    ensemble: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.kind, "--launcher", ("local", "ray"))
        if not self.workers >= 1:
            raise SharpError(f"--workers {self.workers} must be at least 1")
        if not self.cpus_per_run > 0 or not self.gpus_per_run >= 0:
            raise SharpError("--cpus-per-run must be positive and --gpus-per-run zero or positive")
        if self.ensemble is not None and not self.ensemble >= 1:
            raise SharpError(f"--ensemble {self.ensemble} must be at least 1 (1: every run alone)")

    def run(self, jobs: list[tuple], echo: Callable[[str], None] = print) -> list[str]:
        """`execute_run(*job)` for every job; the final states, in the jobs' order."""
        if (self.ensemble or 1) > 1:
            from sharp.ensemble import run_jobs

            return run_jobs(dataclasses.replace(self, ensemble=None), jobs, echo, self.ensemble)
        if self.kind == "ray":
            return _run_ray(jobs, self.ray_address, self.gpus_per_run, self.cpus_per_run, echo)
        return _run_local(jobs, self.workers, echo)


def run_sweep(
    spec: SweepSpec, out: str | Path, launcher: Launcher | None = None, echo: Callable[[str], None] = print
) -> dict[str, str]:
    """Run every run of the grid not yet finished; return {run name: final state}."""
    out, runs = prepare_sweep(spec, out)
    jobs = [(str(out / "runs" / r.name), r.settings, [spec.probe] if spec.probe else None) for r in runs]
    states = (launcher or Launcher()).run(jobs, echo)
    return {Path(job[0]).name: state for job, state in zip(jobs, states, strict=True)}


def _run_local(jobs: list[tuple], workers: int, echo: Callable[[str], None]) -> list[str]:
    if workers <= 1:
        states = []
        for index, job in enumerate(jobs, 1):
            states.append(execute_run(*job))
            echo(f"[{index}/{len(jobs)}] {job_name(job)}: {states[-1]}")
        return states
    with StopSignals(on_signal=_forward_to_workers) as stop, worker_pool(workers) as pool:
        futures = [pool.submit(_pool_job, *job) for job in jobs]
        states = []
        for index, (job, future) in enumerate(zip(jobs, futures, strict=True), 1):
            try:
                states.append(future.result())
            except BrokenProcessPool:  # a worker died (killed, out of memory): the pool stops
                states.append("lost")
            echo(f"[{index}/{len(jobs)}] {job_name(job)}: {states[-1]}")
    if stop.requested:
        stopped = sum(s in ("interrupted", "not started") for s in states)
        raise Interrupted(
            f"stopped by a signal ({stopped} runs interrupted or not started, checkpoints saved);"
            " run the same command again to continue"
        )
    return states


def _forward_to_workers(signum: int) -> None:
    """Pass a stop on to every worker of the pool, as SIGTERM (`sharp.signals`)."""
    for child in active_children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGTERM)


def _pool_job(*job: Any) -> str:
    """`execute_run` in a pool worker; once a stop has reached the worker, it starts no run."""
    if pool_worker_stop_asked():
        return "not started"
    try:
        return execute_run(*job)
    except KeyboardInterrupt:  # the run recorded it (interrupted) with its checkpoint
        return "interrupted"


def job_name(job: tuple) -> str:
    """The run a job trains, or `FIRST+N` for an ensemble of N + 1 runs."""
    if isinstance(job[0], list):
        return f"{Path(job[0][0]).name}+{len(job[0]) - 1}"
    return Path(job[0]).name


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """`workers` fresh (spawned) processes for runs, each with its share of the CPU threads
    and, on a machine with G GPUs, one GPU: worker i sees GPU i mod G only (CUDA_VISIBLE_DEVICES,
    set in the worker before torch starts CUDA there)."""
    threads = max(1, (os.cpu_count() or 1) // workers)  # oversubscribed CPU threads slow torch down many-fold
    gpus = visible_gpus()
    context = get_context("spawn")
    slots = context.Queue()  # one GPU per worker, taken by each worker as it starts
    for index in range(workers):
        slots.put(gpus[index % len(gpus)] if gpus else None)
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_start_worker, initargs=(threads, slots)
    )


def visible_gpus() -> list[str]:
    """The ids of the GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(count)]
    return ids[:count]


def _start_worker(threads: int, slots: Any) -> None:
    listen_as_pool_worker()
    gpu = slots.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import torch

    torch.set_num_threads(threads)


def _run_ray(
    jobs: list[tuple], address: str | None, gpus: float, cpus: float, echo: Callable[[str], None]
) -> list[str]:
    try:
        import ray
    except ImportError:
        raise SharpError("--launcher ray needs Ray: pip install 'sharp[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(execute_run)
        refs = [task.remote(*job) for job in jobs]
        names = {ref: job_name(job) for ref, job in zip(refs, jobs, strict=True)}
        pending, done_states = list(refs), {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                done_states[ref] = ray.get(ref)
                echo(f"[{len(done_states)}/{len(refs)}] {names[ref]}: {done_states[ref]}")
        return [done_states[ref] for ref in refs]
    finally:
        if started_here and address is None:
            ray.shutdown()


def collect(out: str | Path) -> list[dict[str, Any]]:
    """One row per run of a sweep, read from its run directory: varying settings, state, metrics, probes."""
    from sharp.runs import RunDir, read_jsonl

    out = Path(out)
    manifest = out / "sweep.json"
    if not manifest.exists():
        raise SharpError(f"{out} is not a sweep directory (no sweep.json); give the --out of `sharp sweep`")
    record = json.loads(manifest.read_text())
    rows = []
    for entry in record["runs"]:
        run = RunDir(out / "runs" / entry["name"])
        status = run.status() if run.status_file.exists() else {"state": "pending"}
        row: dict[str, Any] = {"run": entry["name"], **entry["point"], "state": status.get("state")}
        metrics = [m for m in read_jsonl(run.metrics) if "test_acc" in m]
        if metrics:
            last = metrics[-1]
            row.update(
                {
                    k: last.get(k)
                    for k in ("step", "epoch", "test_acc", "test_loss", "eval_train_acc", "eval_train_loss")
                }
            )
        probes = sorted(run.probes.glob("*.json")) if run.probes.is_dir() else []
        row["probes"] = len(probes)
        for path in probes:
            row.update(_probe_columns(path))
        if status.get("state") in ("diverged", "failed"):
            row["reason"] = status.get("reason", "")
        rows.append(row)
    return rows


def _probe_columns(path: Path) -> dict[str, Any]:
    """Headline numbers of a probe file as CSV columns named after its label."""
    from analysis.headline import scalars

    record = read_json(path)
    if not isinstance(record, dict):
        return {}
    provenance = record.get("provenance", {})
    checkpoint = provenance.get("checkpoint", "final")
    label = provenance.get("task", record.get("probe", "probe"))
    prefix = label if checkpoint == "final" else f"{checkpoint}:{label}"
    return {f"{prefix}.{name}": value for name, value in scalars(record).items()}


FINAL_STATES = ("finished", "diverged", "failed", "busy", "lost")


def summary(states: dict[str, str]) -> tuple[str, int]:
    """`3 finished, 1 failed` and the exit code of `sharp sweep`: 0 when every run finished or
    diverged, 1 when one failed, was busy (another process wrote it) or lost (its worker died)."""
    values = list(states.values())
    counts = {s: n for s in FINAL_STATES if (n := values.count(s))}
    code = int(any(s not in ("finished", "diverged") for s in values))
    return ", ".join(f"{n} {s}" for s, n in counts.items()), code


def status_table(rows: list[dict[str, Any]]) -> list[str]:
    """The lines of `sharp sweep status`: run, the varying settings, state, test accuracy, probes."""
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
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]
