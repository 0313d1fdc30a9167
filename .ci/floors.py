"""Print `name==floor` for every dependency (and the dev extra) that pyproject.toml declares
with a `>=` floor, so that CI can install the oldest versions we promise to work with.

torch and torchvision are left out: their pair comes from requirements/torch.txt.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PAIRED = {"torch", "torchvision"}
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*(;.*)?$")


def floors(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins = []
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise SystemExit(f"floors: {requirement!r} has no >= floor; declare one")
        name, extra, version, marker = match.groups()
        if name.lower() in PAIRED or (marker and "python_version < '3.11'" in marker):
            continue
        pins.append(f"{name}{extra or ''}=={version}")
    return pins


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print(" ".join(floors(root / "pyproject.toml", sys.argv[1:])))
