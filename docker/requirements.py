"""Prints the project's dependencies (and those of the extras named) from pyproject.toml, one per line, so that the
image installs them in a layer of their own before the code is copied: an edit to vimoe_dist/ then rebuilds only
the small layers after it. Standard library only (it runs before anything is installed).

    python docker/requirements.py pyproject.toml [EXTRA ...] > requirements.txt
"""

from __future__ import annotations

import sys

import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"{pyproject} declares no extra {unknown[0]!r}; extras: {', '.join(optional)}")
    return [*project["dependencies"], *(r for e in extras for r in optional[e])]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
