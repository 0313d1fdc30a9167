"""Run several training scenarios under one torchrun launch, in one process group.

Usage: torchrun --standalone --nproc_per_node 2 tests/ddp_scenarios.py SCENARIOS.json
SCENARIOS.json: a list of {"out": DIR, "settings": {...}, "resume": bool,
"interrupt_at": STEP or null, "dump_buffers": bool}.

With `interrupt_at`, every rank stops at once (KeyboardInterrupt) before that step, as a
kill would, leaving the last checkpoint to resume from; with `dump_buffers`, each rank saves
its own BN buffers as they were before every averaging (a list, in OUT-rankR-buffers.pt).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

import sharp.train as training
from sharp.config import make_config
from sharp.distributed import Distributed


def run_scenario(scenario: dict[str, Any], rank: int) -> None:
    cfg = make_config(scenario["settings"], {})
    original_step, original_average = training.train_step, Distributed.average_buffers
    steps, dumps = [0], []

    def stepping(t, window, lr, stop=False):
        if steps[0] == scenario["interrupt_at"]:
            raise KeyboardInterrupt
        steps[0] += 1
        return original_step(t, window, lr, stop)

    def averaging(self, model):
        dumps.append({k: v.detach().clone() for k, v in model.named_buffers() if v.is_floating_point()})
        torch.save(dumps, f"{scenario['out']}-rank{rank}-buffers.pt")
        original_average(self, model)

    if scenario.get("interrupt_at") is not None:
        training.train_step = stepping
    if scenario.get("dump_buffers"):
        Distributed.average_buffers = averaging
    try:
        training.train(cfg, scenario["out"], resume=scenario.get("resume", False), progress_bar=False)
    except KeyboardInterrupt:
        pass
    finally:
        training.train_step, Distributed.average_buffers = original_step, original_average


if __name__ == "__main__":
    # One process group for every scenario (`train` reuses an initialized group): torchrun's
    # rendezvous does not take a second init_process_group in the same process.
    dist = Distributed.from_env()
    with dist.session(torch.device("cpu")):
        for scenario in json.loads(Path(sys.argv[1]).read_text()):
            run_scenario(scenario, dist.rank)
