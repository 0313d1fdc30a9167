"""`sharp demo`: the whole suite in a few minutes on any machine, without a download.

On scikit-learn's bundled digits: a small-batch and a large-batch ResNet-8 (the large one
with BN over its whole batch, as in Keskar et al.), their epsilon-sharpness and top Hessian
eigenvalues, the interpolation between them, and a report with figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sharp.repro import ReproSpec, run_repro

SMALL_BATCH, LARGE_BATCH = 16, 512


def demo_spec(quick: bool = False) -> dict[str, Any]:
    """The demo as a reproduction spec; `quick` is a seconds-long version for the tests."""
    epochs = 2 if quick else 20
    probe_set = 128 if quick else 512
    return {
        "name": "demo",
        "title": "sharp demo: small- vs large-batch ResNet-8 on digits",
        "base": {
            "dataset": "digits",
            "model": "resnet8",
            "width": 0.5 if quick else 1.0,
            "optimizer": "adam",
            "lr": 0.001,
            "epochs": epochs,
            "eval_every": 1.0,
            "deterministic": True,  # the same numbers on every run of one machine kind
        },
        "groups": {
            "sb_lb": {
                "axes": {"batch_size,micro_batch": [[SMALL_BATCH, SMALL_BATCH], [LARGE_BATCH, LARGE_BATCH]]},
                "probes": [
                    {
                        "probe_set": probe_set,
                        "sharpness": True,
                        "eps": "1e-3,5e-4",
                        "hessian": True,
                        "top_k": 3 if quick else 5,
                        "subspace": None if quick else 100,
                        "trace": not quick,
                        "density": not quick,
                    }
                ],
            }
        },
        "interpolations": [
            {
                "name": "sb-lb",
                "a": {"group": "sb_lb", "batch_size": SMALL_BATCH},
                "b": {"group": "sb_lb", "batch_size": LARGE_BATCH},
                "alphas": "-1:2:7" if quick else "-1:2:25",
                "train_set": 1437,
            }
        ],
    }


def run_demo(out: str | Path = "runs/demo", quick: bool = False, echo=print) -> dict[str, Any]:
    """Run the demo into `out`; return the report path and the headline numbers."""
    from analysis.results import load_runs

    spec = ReproSpec.from_dict(demo_spec(quick), scale="cpu")
    report = run_repro(spec, out, echo=echo)
    headline: dict[str, Any] = {"report": str(report)}
    for run in load_runs([Path(out) / "runs"]):
        label = "sb" if run.batch_size == SMALL_BATCH else "lb"
        headline[f"test_acc_{label}"] = run.final.get("test_acc")
        sharpness = run.probe("epsilon_sharpness", eps=1e-3, subspace_dim=None)
        headline[f"sharpness_{label}"] = sharpness["sharpness"] if sharpness else None
        eigen = run.probe("hessian_eigenvalues")
        headline[f"lambda_max_{label}"] = eigen["eigenvalues"][0] if eigen else None
    return headline
