"""The one JSON of bench/gpu_check.sh: each benchmark's report (or the tail of its log), the keys
of all of them, and the `pytest -m cuda` outcome from its JUnit XML.

python -m bench.gpu_report WORK_DIR OUT_JSON PYTEST_EXIT "BENCHMARK ..." SECONDS
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

LOG_TAIL = 4000  # characters of a log kept when its step left no JSON


def gpu_report(work: Path, benchmarks: list[str], pytest_exit: int, seconds: int) -> dict[str, Any]:
    report: dict[str, Any] = {"seconds": seconds, "benchmarks": {}, "keys": {}}
    for name in benchmarks:
        entry: dict[str, Any] = {"exit_code": int((work / f"bench-{name}.rc").read_text())}
        entry["timed_out"] = entry["exit_code"] == 124  # timeout(1)'s status
        result = work / f"bench-{name}.json"
        if result.exists():
            entry.update(json.loads(result.read_text()))
            report["keys"].update(entry.get("keys", {}))
        else:
            entry["log_tail"] = (work / f"bench-{name}.log").read_text()[-LOG_TAIL:]
        report["benchmarks"][name] = entry
    if "ensemble" not in benchmarks:
        report["ensemble"] = "not registered in bench.run.BENCHMARKS when this ran"
    tests: dict[str, Any] = {"exit_code": pytest_exit, "timed_out": pytest_exit == 124}
    xml = work / "pytest.xml"
    if xml.exists():
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        tests["failed"] = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
    log = work / "pytest.log"
    tests["log_tail"] = log.read_text()[-LOG_TAIL:] if log.exists() else ""
    report["pytest_cuda"] = tests
    report["ok"] = pytest_exit == 0 and all(e["exit_code"] == 0 for e in report["benchmarks"].values())
    return report


def main(argv: list[str] | None = None) -> None:
    work, out, pytest_exit, benchmarks, seconds = argv or sys.argv[1:]
    report = gpu_report(Path(work), benchmarks.split(), int(pytest_exit), int(seconds))
    Path(out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    benchmarks_ok = all(e["exit_code"] == 0 for e in report["benchmarks"].values())
    print(
        f"gpu_check: benchmarks {'ok' if benchmarks_ok else 'FAILED'}, pytest -m cuda exit {pytest_exit}, "
        f"{seconds} s; wrote {out}"
    )


if __name__ == "__main__":
    main()
