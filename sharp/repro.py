"""Paper reproductions: a TOML spec of runs, probes, interpolations and a report, at a scale.

A spec extends the sweep format with named groups:

```toml
name = "keskar"
title = "..."
ensemble = 8                # optional: runs that can share train as ensembles of up to 8 (--ensemble)
[base]                      # `sharp train` settings of every run
[groups.NAME]               # one grid of runs
base = {...}                # the group's own settings (optional)
axes = {...}                # lists whose product is the grid
probes = [{...}, {where = {seed = 0}, checkpoint = "all", ...}]   # `sharp probe` tables
[[interpolations]]          # Keskar's Fig. 3 (or, with path = "sin", Fig. 7) between two runs of a group
a = {group = "NAME", batch_size = 256, seed = 0}
b = {group = "NAME", batch_size = 5000, seed = 0}
[scales.cpu]                # deep-merged over the spec at --scale cpu (tables merge, lists replace)
```

A group's runs may start from another group's run (Keskar's piggybacked LB, Fig. 5): in its
`base` or `axes`, `init_from = {group = "sb", batch_size = 256, seed = 0, checkpoint =
"epoch-0005.pt"}` names one run of that group and one of its checkpoints (`final` by default),
checked when the spec loads, and becomes `--init-from OUT/runs/NAME/checkpoints/epoch-0005.pt`.
Such runs are trained after the runs they start from (the jobs run in dependency stages, with
any launcher).

Runs with the same settings share one directory (`OUT/runs/NAME-HASH`), so a run used by
two groups is trained once; finished runs, probes and interpolations are skipped when the
spec runs again, so a re-run after a crash continues where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharp.config import ProbeConfig, check_choice, make_config, read_table
from sharp.errors import SharpError
from sharp.fileio import atomic_write_json, read_json
from sharp.sweep import FINAL_STATES, Launcher, RunSpec, SweepSpec, run_name

SPEC_DIR = Path(__file__).resolve().parent.parent / "paper_repro"
SCALES = ("cpu", "full")
INTERPOLATION_OPTIONS = ("alphas", "bn", "path", "bn_batch", "bn_set", "train_set", "test_set", "seed")
INTERPOLATION_KEYS = ("name", "a", "b", *INTERPOLATION_OPTIONS)
Job = tuple[str, dict[str, Any], list[dict[str, Any]]]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: tables merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass(frozen=True)
class WarmStart:
    """A run that starts from another run's checkpoint (a spec's `init_from = {group = ...}`)."""

    source: str  # the name of the run it starts from (OUT/runs/NAME)
    checkpoint: str  # the file inside that run: final.pt or checkpoints/epoch-NNNN.pt

    @property
    def relative(self) -> str:
        """The `init_from` of the run's settings, relative to the reproduction's directory (so the
        run's name does not depend on where the reproduction is written)."""
        return f"runs/{self.source}/{self.checkpoint}"

    @property
    def label(self) -> str:
        return Path(self.checkpoint).stem  # "epoch-0005" or "final", in the run's name


@dataclass
class Group:
    """One grid of runs and the probes taken on them."""

    name: str
    runs: list[RunSpec]
    probes: list[dict[str, Any]]

    def probes_for(self, run: RunSpec) -> list[dict[str, Any]]:
        """The probe tables whose `where` matches the run's axis values (all of them if no `where`)."""
        chosen = []
        for probe in self.probes:
            where = probe.get("where", {})
            if all(run.point.get(k, run.settings.get(k)) == v for k, v in where.items()):
                chosen.append({k: v for k, v in probe.items() if k != "where"})
        return chosen


@dataclass
class ReproSpec:
    """A spec resolved at one scale."""

    name: str
    title: str
    scale: str
    raw: dict[str, Any]
    groups: dict[str, Group] = field(default_factory=dict)
    interpolations: list[dict[str, Any]] = field(default_factory=list)
    ensemble: int = 1  # runs that can share train as ensembles of up to this many (sharp.ensemble)
    warm_starts: dict[str, WarmStart] = field(default_factory=dict)  # run name -> where it starts

    @classmethod
    def load(
        cls, name_or_path: str | Path, scale: str = "cpu", overrides: dict[str, Any] | None = None
    ) -> ReproSpec:
        path = Path(name_or_path)
        if not path.is_file():
            path = SPEC_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in SPEC_DIR.glob("*.toml"))) or "none found"
            raise SharpError(f"no reproduction spec {name_or_path!r}: give a TOML path or one of {known}")
        return cls.from_dict(read_table(path, "reproduction spec"), scale, overrides)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], scale: str = "cpu", overrides: dict[str, Any] | None = None
    ) -> ReproSpec:
        check_choice(scale, "--scale", SCALES)
        scales = data.get("scales", {})
        resolved = deep_merge({k: v for k, v in data.items() if k != "scales"}, scales.get(scale, {}))
        if overrides:
            resolved["base"] = {**resolved.get("base", {}), **overrides}
        unknown = sorted(
            set(resolved)
            - {"name", "title", "paper", "description", "base", "groups", "interpolations", "report"}
            - {"ensemble"}
        )
        if unknown:
            raise SharpError(f"spec {data.get('name')!r}: unknown key {unknown[0]!r}")
        spec = cls(str(resolved.get("name", "repro")), str(resolved.get("title", "")), scale, resolved)
        spec.ensemble = resolved.get("ensemble", 1)
        if not isinstance(spec.ensemble, int) or isinstance(spec.ensemble, bool) or spec.ensemble < 1:
            raise SharpError(f"spec {spec.name!r}: ensemble = {spec.ensemble!r} must be a whole number >= 1")
        spec._build_groups(resolved.get("groups", {}), resolved.get("base", {}))
        report = resolved.get("report", {})
        extra = sorted(set(report) - {"goal_losses", "sb_batch", "lb_batch", "figures", "keskar_tables"})
        if extra:
            raise SharpError(
                f"spec [report]: unknown key {extra[0]!r}; use goal_losses, sb_batch, lb_batch, figures, "
                "keskar_tables"
            )
        if not isinstance(report.get("keskar_tables", True), bool):
            raise SharpError("spec [report]: keskar_tables must be true or false")
        if "figures" in report:
            from analysis.report import check_figure_names

            check_figure_names(report["figures"])
        spec.interpolations = list(resolved.get("interpolations", []))
        for index, interp in enumerate(spec.interpolations):
            extra = sorted(set(interp) - set(INTERPOLATION_KEYS))
            if extra:
                raise SharpError(
                    f"spec interpolations[{index}]: unknown key {extra[0]!r}; "
                    f"use {', '.join(INTERPOLATION_KEYS)}"
                )
            for side in ("a", "b"):
                spec.find_run(interp.get(side, {}), f"interpolations[{index}].{side}")
        return spec

    def _build_groups(self, groups: dict[str, Any], base: dict[str, Any]) -> None:
        """Expand every group, each after the groups its `init_from` selectors name."""
        built: dict[str, Group] = {}
        pending = dict(groups)
        while pending:
            ready = []
            for name, group in pending.items():
                needed = _selected_groups(group, base)
                unknown = sorted(needed - set(groups))
                if unknown:
                    raise SharpError(
                        f"spec group {name!r}: init_from names no group {unknown[0]!r}; "
                        f"choose one of {', '.join(groups)}"
                    )
                if needed <= set(built):
                    ready.append(name)
            if not ready:
                raise SharpError(
                    f"spec groups {', '.join(sorted(pending))} start from each other's runs in a circle: "
                    "let one of them start from scratch"
                )
            for name in ready:
                self.groups = built  # find_run looks up the groups built so far
                built[name] = self._build_group(name, pending.pop(name), base)
        self.groups = {name: built[name] for name in groups}  # in the spec's order

    def _build_group(self, name: str, group: dict[str, Any], base: dict[str, Any]) -> Group:
        extra = sorted(set(group) - {"base", "axes", "probes"})
        if extra:
            raise SharpError(f"spec group {name!r}: unknown key {extra[0]!r}; use base, axes, probes")
        starts: dict[str, WarmStart] = {}

        def resolve(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                return value
            start = self._warm_start(value, where)
            starts[start.relative] = start
            return start.relative

        settings = {**base, **group.get("base", {})}
        if "init_from" in settings:
            settings["init_from"] = resolve(settings["init_from"], f"group {name!r} init_from")
        axes = {}
        for key, values in group.get("axes", {}).items():
            names = [k.strip() for k in key.split(",")]
            if "init_from" in names and isinstance(values, list):
                at, where = names.index("init_from"), f"group {name!r} axes.{key}"
                if len(names) == 1:
                    values = [resolve(v, where) for v in values]
                else:
                    values = [
                        [resolve(x, where) if i == at else x for i, x in enumerate(v)]
                        if isinstance(v, list)
                        else v
                        for v in values
                    ]
            axes[key] = values
        grid = SweepSpec.from_dict({"base": settings, "axes": axes}, default_name=name)
        probes = list(group.get("probes", []))
        for probe in probes:
            make_config({k: v for k, v in probe.items() if k != "where"}, {}, ProbeConfig)
        runs = grid.runs()
        for run in runs:
            start = starts.get(run.settings.get("init_from") or "")
            if start is None:
                continue
            if "init_from" in run.point:  # name the checkpoint, not its path, in the run's name
                run.name = run_name({**run.point, "init_from": start.label}, run.settings)
            self.warm_starts[run.name] = start
        return Group(name, runs, probes)

    def _warm_start(self, selector: dict[str, Any], where: str) -> WarmStart:
        """The run and checkpoint an `init_from = {group = ..., checkpoint = ..., settings...}` names."""
        keys = {k: v for k, v in selector.items() if k != "checkpoint"}
        source = self.find_run(keys, where)
        text = str(selector.get("checkpoint", "final"))
        stem = text.removesuffix(".pt")
        if stem == "final":
            return WarmStart(source.name, "final.pt")
        match = re.fullmatch(r"(?:checkpoints/)?epoch-(\d+)", stem)
        if match is None:
            raise SharpError(f"spec {where}: checkpoint {text!r} is unknown: give final or epoch-NNNN.pt")
        epoch, every = int(match.group(1)), source.settings.get("checkpoint_every")
        if not every or epoch % every:
            raise SharpError(
                f"spec {where}: run {source.name} keeps no epoch-{epoch:04d}.pt "
                f"(checkpoint_every = {every}): choose a multiple of its checkpoint_every"
            )
        epochs = source.settings.get("epochs")
        if epochs is not None and epoch > epochs:
            raise SharpError(
                f"spec {where}: run {source.name} trains at most {epochs} epochs, so it has no "
                f"epoch-{epoch:04d}.pt: choose an earlier checkpoint"
            )
        return WarmStart(source.name, f"checkpoints/epoch-{epoch:04d}.pt")

    def find_run(self, selector: dict[str, Any], where: str) -> RunSpec:
        """The one run of `selector["group"]` whose settings match the selector's other keys."""
        group = self.groups.get(selector.get("group", ""))
        if group is None:
            raise SharpError(
                f"spec {where}: name an existing group, e.g. group = {next(iter(self.groups), '?')!r}"
            )
        keys = {k: v for k, v in selector.items() if k != "group"}
        found = [r for r in group.runs if all(r.settings.get(k) == v for k, v in keys.items())]
        if len(found) != 1:
            raise SharpError(
                f"spec {where}: {keys} matches {len(found)} runs of group {group.name!r}; "
                "it must match exactly one"
            )
        return found[0]

    def jobs(self, out: Path) -> list[Job]:
        """One job per distinct run: (run directory, settings, every probe table any group asks of it);
        a warm-started run's init_from is the path of its source checkpoint under `out`."""
        jobs: dict[str, Job] = {}
        for group in self.groups.values():
            for run in group.runs:
                path = str(out / "runs" / run.name)
                settings = dict(run.settings)
                if run.name in self.warm_starts:
                    settings["init_from"] = str(out / self.warm_starts[run.name].relative)
                job = jobs.setdefault(run.name, (path, settings, []))
                for probe in group.probes_for(run):
                    if probe not in job[2]:
                        job[2].append(probe)
        return list(jobs.values())

    def job_stages(self, out: Path) -> list[list[Job]]:
        """The jobs in the order they can run: those that start from no other run, then those that
        start from them, and so on (each stage may run in parallel)."""
        depth: dict[str, int] = {}

        def level(name: str) -> int:
            if name not in depth:
                start = self.warm_starts.get(name)
                depth[name] = 0 if start is None else level(start.source) + 1
            return depth[name]

        stages: dict[int, list[Job]] = {}
        for job in self.jobs(out):
            stages.setdefault(level(Path(job[0]).name), []).append(job)
        return [stages[d] for d in sorted(stages)]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "scale": self.scale,
            "spec": self.raw,
            "groups": {g.name: [r.name for r in g.runs] for g in self.groups.values()},
        }


def run_repro(
    spec: ReproSpec,
    out: str | Path,
    launcher: Launcher | None = None,
    device: str = "auto",
    echo: Callable[[str], None] = print,
) -> Path:
    """Train and probe every run, compute the interpolations, write OUT/report.md; return its path."""
    out = Path(out)
    manifest = out / "repro.json"
    history: list[dict[str, float]] = []  # the timings of earlier invocations, oldest first
    if manifest.exists():
        existing = json.loads(manifest.read_text())
        if (
            _what_runs(existing.get("spec", {})) != _what_runs(spec.raw)
            or existing.get("scale") != spec.scale
        ):
            raise SharpError(
                f"{out} holds another reproduction ({existing.get('name')}, "
                f"{existing.get('scale')}); choose another --out"
            )
        history = [*existing.get("history", []), *([existing["timings"]] if existing.get("timings") else [])]
    (out / "runs").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    atomic_write_json(
        manifest, {**spec.describe(), "timings": timings, "history": history, "state": "running"}
    )

    started = time.perf_counter()
    stages = spec.job_stages(out)
    if device != "auto":  # every stage: training, probes and (below) interpolations
        stages = [
            [
                (path, {**settings, "device": device}, [{**probe, "device": device} for probe in probes])
                for path, settings, probes in jobs
            ]
            for jobs in stages
        ]
    count = sum(len(jobs) for jobs in stages)
    later = f", in {len(stages)} stages (warm-started runs after their sources)" if len(stages) > 1 else ""
    echo(f"{spec.name} ({spec.scale}): {count} runs{later}")
    launcher = launcher or Launcher()
    if launcher.ensemble is None:  # --ensemble not given: the spec's
        launcher = dataclasses.replace(launcher, ensemble=spec.ensemble)
    states: list[str] = []
    for jobs in stages:  # in turn: a warm-started run needs its source's checkpoint
        states += launcher.run(jobs, echo)
    timings["runs"] = time.perf_counter() - started

    mark = time.perf_counter()
    interpolations = []
    for index, interp in enumerate(spec.interpolations):
        record = _interpolation(spec, interp, index, out, device, echo)
        if record is not None:
            interpolations.append(record)
    timings["interpolations"] = time.perf_counter() - mark

    mark = time.perf_counter()
    from analysis.report import build_report
    from analysis.results import load_runs

    runs = load_runs([out / "runs"])
    options = spec.raw.get("report", {})
    report = build_report(
        runs,
        out,
        scale=spec.scale,
        title=spec.title or spec.name,
        interpolations=interpolations,
        goal_losses=options.get("goal_losses"),
        sb_batch=options.get("sb_batch"),
        lb_batch=options.get("lb_batch"),
        figures=options.get("figures"),
        keskar_section=options.get("keskar_tables", True),
    )
    timings["report"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    counts = {s: states.count(s) for s in FINAL_STATES if states.count(s)}
    record = {**spec.describe(), "timings": timings, "history": history, "state": "finished", "runs": counts}
    atomic_write_json(manifest, {**record, "device": device, "devices": devices_used(out)})
    return report


def devices_used(out: Path) -> dict[str, list[str]]:
    """The devices each stage of a reproduction really ran on, as its results record them (a
    result that cannot be read records none)."""

    def read(path: Path) -> dict[str, Any]:
        return read_json(path) or {}

    runs = sorted((out / "runs").glob("*/config.json"))
    probes = sorted((out / "runs").glob("*/probes/*.json"))
    interpolations = sorted((out / "interpolations").glob("*/interp.json"))
    found = {
        "training": [read(p).get("environment", {}).get("device") for p in runs],
        "probes": [read(p).get("provenance", {}).get("device") for p in probes],
        "interpolations": [read(p).get("provenance", {}).get("device") for p in interpolations],
    }
    return {stage: sorted({d for d in devices if d}) for stage, devices in found.items()}


def _selected_groups(group: dict[str, Any], base: dict[str, Any]) -> set[str]:
    """The groups whose runs the `init_from` selectors of a group (its base, the spec's base or its
    axes) name."""
    selectors = [{**base, **group.get("base", {})}.get("init_from")]
    for key, values in group.get("axes", {}).items():
        names = [k.strip() for k in key.split(",")]
        if "init_from" in names and isinstance(values, list):
            at = names.index("init_from")
            for value in values:
                if len(names) > 1:
                    value = value[at] if isinstance(value, list) and len(value) > at else None
                selectors.append(value)
    return {str(s.get("group")) for s in selectors if isinstance(s, dict)}


def _what_runs(spec: dict[str, Any]) -> dict[str, Any]:
    """The parts of a resolved spec that decide its runs and interpolations (a reproduction may
    be re-reported with other [report] options or titles, not re-run with other settings)."""
    return {k: spec.get(k) for k in ("base", "groups", "interpolations")}


def _interpolation(
    spec: ReproSpec, interp: dict[str, Any], index: int, out: Path, device: str, echo: Callable[[str], None]
) -> dict[str, Any] | None:
    from sharp.probe_runs import run_interpolation

    run_a = spec.find_run(interp["a"], f"interpolations[{index}].a")
    run_b = spec.find_run(interp["b"], f"interpolations[{index}].b")
    target = out / "interpolations" / interp.get("name", f"{run_a.name}--{run_b.name}")
    path_a, path_b = out / "runs" / run_a.name, out / "runs" / run_b.name
    for path in (path_a, path_b):
        if not (path / "final.pt").exists():
            echo(f"skip interpolation {target.name}: {path.name} did not finish")
            return None
    if not (target / "interp.json").exists():
        options = {k: interp[k] for k in INTERPOLATION_OPTIONS if k in interp}
        run_interpolation(path_a, path_b, out=target, device=device, **options)
        echo(f"interpolation {target.name}: done")
    return json.loads((target / "interp.json").read_text())
