"""Write constraints.txt: the installed version of every package ember's pyproject needs (all extras), transitively.

Run in the environment CI tested (python 3.11, CPU torch) after changing pyproject's dependencies:
    python .ci/freeze_constraints.py > constraints.txt
"""

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
roots = [Requirement(r) for r in project["dependencies"]]
roots += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
pinned: dict[str, tuple[str, str]] = {}


def walk(requirement: Requirement) -> None:
    key = canonicalize_name(requirement.name)
    if key in pinned:
        return
    try:
        dist = md.distribution(requirement.name)
    except md.PackageNotFoundError:
        sys.exit(f"{requirement.name} is not installed: install '.[test,hf]' first")
    pinned[key] = (dist.metadata["Name"], dist.version.split("+")[0])  # torch 2.13.0+cpu pins 2.13.0: CPU or CUDA
    for text in dist.requires or []:
        sub = Requirement(text)
        extras = ("", *requirement.extras)
        if sub.marker is None or any(sub.marker.evaluate({"extra": extra}) for extra in extras):
            walk(sub)


for root in roots:
    walk(root)
print("# The versions CI tests with (python 3.11, CPU torch). pip install -c constraints.txt -e '.[test]'")
print("# Regenerate: python .ci/freeze_constraints.py > constraints.txt")
for name, version in sorted(pinned.values(), key=lambda item: canonicalize_name(item[0])):
    print(f"{name}=={version}")
