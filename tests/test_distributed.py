"""One run across processes: sharded windows and DDP (gloo, CPU) against a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sharp.cli import cli
from sharp.config import TrainConfig
from sharp.data import DeviceLoader
from sharp.runs import RunDir, read_jsonl
from sharp.train import TIMING_KEYS, train

REPO = Path(__file__).resolve().parent.parent


def test_ranks_share_every_window_exactly(synthetic):
    def shares(world):
        per_rank = []
        for rank in range(world):
            loader = DeviceLoader(
                synthetic.train_images,
                synthetic.train_labels,
                synthetic.mean,
                synthetic.std,
                seed=3,
                rank=rank,
                world_size=world,
            )
            per_rank.append(
                [
                    torch.cat([y for _, y in w.micro_batches()]) if w.count >= world else None
                    for w in loader.windows(0, 60, 16)
                ]
            )
        return per_rank

    single = shares(1)[0]
    double = shares(2)
    for step, labels in enumerate(single):
        assert torch.equal(torch.cat([double[0][step], double[1][step]]), labels)
    # 256 examples = 4 windows of 60 (30 per rank) and a short one of 16 (8 per rank)
    assert [len(y) for y in double[0]] == [30, 30, 30, 30, 8] == [len(y) for y in double[1]]


def test_two_gloo_processes_end_with_the_single_process_weights(tmp_path):
    args = [
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--norm",
        "none",
        "--precision",
        "fp64",
        "--batch-size",
        "60",
        "--micro-batch",
        "16",
        "--epochs",
        "1",
        "--lr",
        "0.5",
        "--momentum",
        "0.9",
        "--quiet",
    ]
    runner = CliRunner()
    single = runner.invoke(cli, [*args, "--out", str(tmp_path / "one")])
    double = runner.invoke(cli, [*args, "--out", str(tmp_path / "two"), "--nproc", "2"])
    assert single.exit_code == 0 and double.exit_code == 0, single.output + double.output
    a = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-10
    derived = json.loads((tmp_path / "two" / "config.json").read_text())["derived"]
    assert (
        derived["world_size"] == 2 and derived["accumulation_steps"] == 2 and derived["effective_batch"] == 60
    )
    assert not (tmp_path / "two" / "run.lock").exists()


def run_two_gloo_ranks(script: Path, *args: Path, timeout: int) -> None:
    """Run `script ARGS` under torchrun with two CPU ranks (this checkout importable); it must exit 0."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [*command, str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


RELEASE_CHECK = """
import gc, weakref, torch
import torch.distributed.distributed_c10d as c10d
from sharp.distributed import Distributed

with Distributed.from_env().session(torch.device("cpu")):
    group = weakref.ref(c10d._get_default_group())
    torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)  # torch imports its compiler here
gc.collect()
assert group() is None, "the process group outlived its session"
"""


def test_session_releases_its_process_group_before_the_interpreter_exits(tmp_path):
    """A process group alive at interpreter exit is torn down there, where Gloo's threads can
    abort a rank that finished its run (SIGABRT, seen once in CI): the session must free it."""
    script = tmp_path / "release_check.py"
    script.write_text(RELEASE_CHECK)
    run_two_gloo_ranks(script, timeout=300)


# --- several runs under one torchrun launch (tests/ddp_scenarios.py) --------------------------

COMMON = dict(dataset="digits", precision="fp64", deterministic=True)
MLP = dict(model="mlp", norm="none")
# what the BN convnet scenarios share
CONVNET_BN = dict(model="convnet", norm="bn", batch_size=64, micro_batch=16, lr=0.1, eval_every=0.5)
SCENARIOS = {
    # 1437 examples, drop_last: 22 windows of 64, i.e. 4 micro-batches of 16 in one process and
    # 2 per rank in two: the same micro-batches, so the same online noise-scale series
    "noise": dict(
        MLP,
        batch_size=64,
        micro_batch=16,
        drop_last=True,
        epochs=1,
        lr=0.2,
        noise_scale=True,
        eval_every=0.25,
    ),
    # BN: each rank normalizes its micro-batches of 16, i.e. ghost BN of 16 in one process
    "bn": dict(CONVNET_BN, drop_last=True, epochs=1),
    # --sync-bn: every global micro-batch of 2 x 16 is normalized as one, as one process does
    # with micro-batches of 32; the short last window (29: shares 15 and 14) included
    "sync_bn": dict(CONVNET_BN, epochs=1, sync_bn=True),
    # 1437 = 359 x 4 + 1: the last window has one example, so rank 1's share is empty
    "empty_share": dict(MLP, batch_size=4, micro_batch=2, epochs=1, lr=0.05),
    "until_loss": dict(
        MLP, batch_size=64, micro_batch=32, epochs=20, lr=0.2, until_train_loss=0.3, eval_every=0.5
    ),
    "resume": dict(CONVNET_BN, epochs=2, momentum=0.9),
    # SAM: the ascent from the all-reduced window gradient, whatever the shares; the short last
    # window (29: shares 15 and 14, against micro-batches 16 and 13 in one process) included
    "sam": dict(MLP, batch_size=64, micro_batch=16, epochs=1, lr=0.2, momentum=0.9, sam_rho=0.05),
    # m-SAM (ASAM's ascent) per group of 4 of each micro-batch: drop_last keeps every rank's
    # micro-batches those of one process, so the groups are the same
    "m_sam": dict(
        MLP,
        batch_size=64,
        micro_batch=16,
        drop_last=True,
        epochs=1,
        lr=0.2,
        momentum=0.9,
        sam_rho=0.05,
        sam_adaptive=True,
        sam_m=4,
    ),
}


def _max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Every scenario trained by 2 gloo ranks (one launch), and the resume scenario also
    interrupted at step 30 and resumed (a second launch)."""
    root = tmp_path_factory.mktemp("ddp")

    def launch(scenarios):
        spec = root / f"scenarios-{len(list(root.glob('*.json')))}.json"
        spec.write_text(json.dumps(scenarios))
        run_two_gloo_ranks(REPO / "tests" / "ddp_scenarios.py", spec, timeout=600)

    first = [
        {"out": str(root / name), "settings": {**COMMON, **settings}, "dump_buffers": name == "bn"}
        for name, settings in SCENARIOS.items()
    ]
    first.append(
        {"out": str(root / "cut"), "settings": {**COMMON, **SCENARIOS["resume"]}, "interrupt_at": 30}
    )
    launch(first)
    assert RunDir(root / "cut").status()["state"] == "interrupted"
    launch([{"out": str(root / "cut"), "settings": {**COMMON, **SCENARIOS["resume"]}, "resume": True}])
    return root


def _single(tmp_path, digits, name, **extra):
    cfg = TrainConfig(**{**COMMON, **SCENARIOS[name], **extra})
    train(cfg, tmp_path / name, dataset=digits, progress_bar=False)
    return tmp_path / name


def _final(path):
    return torch.load(path / "final.pt", weights_only=True)


def test_ddp_online_noise_scale_equals_one_process(ddp_runs, tmp_path, digits):
    one = _single(tmp_path, digits, "noise")
    series = [
        [m["noise_b_simple"] for m in read_jsonl(path / "metrics.jsonl") if m.get("noise_b_simple")]
        for path in (one, ddp_runs / "noise")
    ]
    assert len(series[0]) >= 4 and len(series[0]) == len(series[1])
    # fp64, the same micro-batches: only the summation order of the all-reduce differs
    assert series[1] == pytest.approx(series[0], rel=1e-8)
    assert _max_diff(_final(one), _final(ddp_runs / "noise")) < 1e-10


def test_ddp_bn_equals_ghost_bn_and_saves_the_mean_of_the_ranks_buffers(ddp_runs, tmp_path, digits):
    one = _single(tmp_path, digits, "bn", bn_batch=16)
    ours, theirs = _final(ddp_runs / "bn"), _final(one)
    params = [k for k in ours if "running" not in k and "num_batches" not in k]
    assert max((ours[k] - theirs[k]).abs().max().item() for k in params) < 1e-10
    dumps = [torch.load(ddp_runs / f"bn-rank{r}-buffers.pt", weights_only=True) for r in (0, 1)]
    differing = [i for i, (a, b) in enumerate(zip(*dumps, strict=True)) if _max_diff(a, b) > 0]
    assert differing, "the ranks' running statistics never differed: the test shows nothing"
    last = differing[-1]
    for key, value in dumps[0][last].items():
        mean = (value + dumps[1][last][key]) / 2  # what was saved is the two ranks' mean, exactly
        assert torch.allclose(ours[key], mean, rtol=0, atol=1e-14)
    # config.json says what the run did: BN over each rank's own micro-batches of 16 (the ghost
    # batch of the single process above), the ranks' buffers averaged as the dumps show
    derived = json.loads((ddp_runs / "bn" / "config.json").read_text())["derived"]
    assert derived["bn_batch"] == 16
    assert derived["bn_across_ranks"] == "per rank; buffers averaged before every evaluation and checkpoint"


def test_ddp_window_with_an_empty_rank_share(ddp_runs, tmp_path, digits):
    one = _single(tmp_path, digits, "empty_share")
    assert _max_diff(_final(one), _final(ddp_runs / "empty_share")) < 1e-10


def test_ddp_until_train_loss_stops_every_rank_at_the_single_process_step(ddp_runs, tmp_path, digits):
    one = _single(tmp_path, digits, "until_loss")
    steps = [RunDir(path).status()["step"] for path in (one, ddp_runs / "until_loss")]
    assert steps[0] == steps[1] < 20 * 23  # stopped early, at the same evaluation
    assert "until-train-loss" in RunDir(ddp_runs / "until_loss").status()["reason"]
    assert _max_diff(_final(one), _final(ddp_runs / "until_loss")) < 1e-10


def test_ddp_resume_is_bit_identical(ddp_runs):
    full, cut = _final(ddp_runs / "resume"), _final(ddp_runs / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in ms]  # noqa: E731
    assert strip(read_jsonl(ddp_runs / "resume" / "metrics.jsonl")) == strip(
        read_jsonl(ddp_runs / "cut" / "metrics.jsonl")
    )


def test_ddp_sync_bn_equals_one_process_normalizing_both_shares_together(ddp_runs, tmp_path, digits):
    one = _single(tmp_path, digits, "sync_bn", micro_batch=32, sync_bn=False)
    ours, theirs = _final(ddp_runs / "sync_bn"), _final(one)
    # fp64: rounding only, in the weights and in the running statistics (identical on both ranks)
    assert _max_diff(ours, theirs) < 1e-10
    derived = json.loads((ddp_runs / "sync_bn" / "config.json").read_text())["derived"]
    assert derived["bn_batch"] == 32 and derived["bn_across_ranks"].startswith("synchronized")


@pytest.mark.parametrize("name", ["sam", "m_sam"])
def test_ddp_sam_equals_one_process(ddp_runs, tmp_path, digits, name):
    one = _single(tmp_path, digits, name)
    # fp64, the same examples in each ascent: only the summation order of the all-reduce differs
    assert _max_diff(_final(one), _final(ddp_runs / name)) < 1e-10
    plain = _single(tmp_path / "plain", digits, name, sam_rho=0.0, sam_adaptive=False, sam_m=None)
    assert _max_diff(_final(plain), _final(one)) > 1e-6  # SAM did change the run
    derived = json.loads((ddp_runs / name / "config.json").read_text())["derived"]
    assert derived["world_size"] == 2 and derived["sam"]["rho"] == 0.05
