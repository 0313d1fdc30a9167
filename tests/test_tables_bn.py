"""Keskar tables with sharpness probed in two BN modes: running statistics beside recomputed ones.

Synthetic run directories (no torch): the expected cells are worked out by hand below.
"""

from __future__ import annotations

import pytest
from test_analysis import evaluations, make_run, number, read_csv, sharpness

from analysis.ablation import keskar_ablation
from analysis.results import load_runs
from analysis.tables import keskar_tables


def probed(value, bn_mode, eps=1e-3, p=None):
    record = sharpness(value, eps=eps, p=p)
    record["bn_mode"] = bn_mode
    record["provenance"]["bn_mode"] = bn_mode
    return record


@pytest.fixture
def two_mode_runs(tmp_path):
    """SB (B=32) and LB (B=1024), two seeds each, each probed with running and recomputed BN."""
    values = {  # (eval, recompute) full-space sharpness at eps = 1e-3; subspace p=100 at 1e-3
        ("sb0", 32, 0): (2.0, 1.0, 0.2, 0.1),
        ("sb1", 32, 1): (4.0, 1.5, 0.4, 0.2),
        ("lb0", 1024, 0): (100.0, 50.0, 10.0, 4.0),
        ("lb1", 1024, 1): (300.0, 70.0, 30.0, 6.0),
    }
    for (name, batch, seed), (stale, fresh, sub_stale, sub_fresh) in values.items():
        metrics = evaluations([2.3, 0.6, 0.3], [0.1, 0.7, 0.9], batch=batch)
        probes = [
            probed(stale, "eval"),
            probed(fresh, "recompute"),
            probed(sub_stale, "eval", p=100),
            probed(sub_fresh, "recompute", p=100),
        ]
        make_run(tmp_path / "runs", name, batch=batch, seed=seed, metrics=metrics, probes=probes)
    return load_runs([tmp_path / "runs"])


def test_tables_show_running_and_recomputed_statistics_side_by_side(two_mode_runs, tmp_path):
    markdown = keskar_tables(two_mode_runs, tmp_path / "t", sb_batch=32, lb_batch=1024)
    table3 = markdown.split("### Table 3")[1].split("### Table 4")[0]
    rows = {
        line.split("|")[1].strip(): line for line in table3.splitlines() if "this run" in line or "÷" in line
    }
    stale = rows["**this run**, BN: running statistics"]
    fresh = rows["**this run**, BN: recomputed"]
    ratio = rows["recompute ÷ eval"]
    assert "3.00 ± 1.41 (n=2)" in stale and "200.00 ± 141.42 (n=2)" in stale  # SB (2, 4), LB (100, 300)
    assert "1.25 ± 0.35 (n=2)" in fresh and "60.00 ± 14.14 (n=2)" in fresh  # SB (1, 1.5), LB (50, 70)
    assert "0.42×" in ratio and "0.30×" in ratio  # 1.25 / 3 and 60 / 200: ratios of the means
    table4 = markdown.split("### Table 4")[1]
    assert "0.30 ± 0.14 (n=2)" in table4 and "0.15 ± 0.07 (n=2)" in table4 and "0.50×" in table4
    assert "recomputed = recomputed at the final weights" in markdown
    csv = read_csv(tmp_path / "t" / "keskar_tables.csv")
    ours = [r for r in csv if r["source"] == "this run" and r["table"] == "3" and r["eps"] == "0.001"]
    by_mode = {(r["bn_mode"], r["regime"]): number(r["mean"]) for r in ours}
    assert by_mode == {
        ("eval", "SB"): 3.0,
        ("eval", "LB"): 200.0,
        ("recompute", "SB"): 1.25,
        ("recompute", "LB"): 60.0,
    }


def test_one_bn_mode_keeps_the_single_row(tmp_path):
    for name, batch, value in (("sb", 32, 2.0), ("lb", 1024, 100.0)):
        metrics = evaluations([2.3, 0.6, 0.3], [0.1, 0.7, 0.9], batch=batch)
        make_run(tmp_path / "runs", name, batch=batch, metrics=metrics, probes=[probed(value, "recompute")])
    markdown = keskar_tables(load_runs([tmp_path / "runs"]), tmp_path / "t", sb_batch=32, lb_batch=1024)
    table3 = markdown.split("### Table 3")[1].split("### Table 4")[0]
    ours = [line for line in table3.splitlines() if "this run" in line]
    assert len(ours) == 1 and ours[0].startswith("| **this run** |") and "2.00 (n=1)" in ours[0]
    assert "÷" not in markdown


def test_a_family_without_batch_norm_is_labelled_no_bn_not_by_the_probes_bn_mode(tmp_path):
    for norm in ("bn", "none"):
        for name, batch, value in (("sb", 32, 2.0), ("lb", 1024, 100.0)):
            metrics = evaluations([2.3, 0.6, 0.3], [0.1, 0.7, 0.9], batch=batch)
            probes = [probed(value, "eval")]
            make_run(
                tmp_path / "runs", f"{name}-{norm}", batch=batch, norm=norm, metrics=metrics, probes=probes
            )
    runs = load_runs([tmp_path / "runs"])
    table3 = keskar_tables(runs, tmp_path / "t", sb_batch=32, lb_batch=1024).split("### Table 3")[1]
    labels = [
        line.split("|")[1].strip()
        for line in table3.split("### Table 4")[0].splitlines()
        if "this run" in line
    ]
    by_net = {"(bn)" in label: label.rsplit(", ", 1)[1] for label in labels}
    assert len(labels) == 2 and by_net == {True: "BN: running statistics", False: "no BN"}, labels
    ablation = keskar_ablation(runs, tmp_path / "a", sb_batch=32, lb_batch=1024)
    bn_cells = sorted(
        line.split("|")[3].strip() for line in ablation.splitlines() if line.startswith("| mlp")
    )
    assert bn_cells == ["BN: running statistics", "no BN"]


def test_report_of_one_bn_mode_reads_only_its_probes(two_mode_runs, tmp_path):
    """`sharp report --bn-mode recompute`: Table 3 holds the recomputed numbers alone (worked out in
    the fixture: SB mean of 1 and 1.5, LB of 50 and 70), no eval row and no ratio between modes."""
    from click.testing import CliRunner

    from sharp.cli import cli

    runner = CliRunner()
    result = runner.invoke(
        cli, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "--bn-mode", "recompute"]
    )
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "r" / "report.md").read_text()
    table3 = markdown.split("### Table 3")[1].split("### Table 4")[0]
    ours = [line for line in table3.splitlines() if "this run" in line]
    assert len(ours) == 1 and "1.25 ± 0.35 (n=2)" in ours[0] and "60.00 ± 14.14 (n=2)" in ours[0]
    assert "recompute ÷ eval" not in markdown and "BN: running statistics" not in markdown
    assert "`--bn-mode recompute`" in markdown
    bad = runner.invoke(
        cli, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "b"), "--bn-mode", "train"]
    )
    assert bad.exit_code == 2 and "--bn-mode 'train' is unknown" in bad.output
    assert not (tmp_path / "b").exists()
