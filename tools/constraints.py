"""The pinned set of the tested versions: `constraints.txt`, read by `make`, CI (through make) and docker/Dockerfile.

The set is the dependency closure of pyproject.toml (its dependencies and every extra, plus pip), with the versions
installed in the environment this script runs in: the venv the test suite passed with. Strays installed by hand are
left out because nothing in the closure asks for them. Markers are evaluated for this interpreter and platform
(Linux x86_64, the Python of the venv), which is what the Dockerfile builds.

    python tools/constraints.py > constraints.txt     # `make constraints` does this with .venv's python
    python tools/constraints.py --check constraints.txt   # exit 1 and the differences when they disagree
"""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("pip",)  # not a dependency of anything, but `make` and the Dockerfile install it first, pinned
HEADER = """\
# The pinned set of the tested versions: the dependency closure of pyproject.toml (all extras) as installed in the
# venv the test suite passed with ({python}, {machine}). Used by the Makefile, CI (through make) and
# docker/Dockerfile as `pip install -c constraints.txt ...`. Regenerate with `make constraints` after a change of
# dependencies; tests/unit/test_packaging.py checks that it matches the venv the tests run in.
"""


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    """The project's dependencies and the requirements of every extra it declares."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(Requirement(r) for r in extra)
    return reqs


def closure(roots: list[Requirement]) -> dict[str, str]:
    """canonical name -> installed version of every distribution `roots` need here, recursively.

    Raises:
        SystemExit: a required distribution is not installed (the environment is not the tested one).
    """
    pinned: dict[str, str] = {}
    todo = [(r, "") for r in roots]
    seen: set[tuple[str, str]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        extras = sorted(req.extras) or [""]
        if all((name, e) in seen for e in extras):
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req.name} is required but not installed in {sys.prefix}") from None
        pinned[name] = dist.version
        for e in extras:
            if (name, e) in seen:
                continue
            seen.add((name, e))
            todo.extend((Requirement(r), e) for r in dist.requires or [])
    return pinned


def render(pins: dict[str, str]) -> str:
    machine = f"{platform.system()} {platform.machine()}"
    head = HEADER.format(python=f"Python {platform.python_version()}", machine=machine)
    return head + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))


def read_pins(path: Path) -> dict[str, str]:
    """canonical name -> version of every `name==version` line of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def current_pins() -> dict[str, str]:
    return closure([*project_requirements(), *(Requirement(t) for t in TOOLS)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, metavar="FILE", help="compare FILE with this environment instead")
    args = parser.parse_args()
    pins = current_pins()
    if args.check is None:
        sys.stdout.write(render(pins))
        return 0
    want = read_pins(args.check)
    diff = sorted(set(pins.items()) ^ set(want.items()))
    for name in sorted({n for n, _ in diff}):
        print(f"{name}: {args.check} pins {want.get(name, '-')}, installed {pins.get(name, '-')}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
