"""A pytest plugin (`-p xdist_groups`, from the Makefile) that keeps together what must share one worker under
`pytest -n 2 --dist loadgroup`: the system tests (one Slurm cluster, one Prometheus), the fault tests (their session
fixtures train a reference run once) and each multi-process module (its module fixtures start the jobs once). The
unit tests, which run in the test process itself, go wherever a worker is free."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def group_of(path: Path) -> str | None:
    """The xdist group of a test file, or None for a test that can run on any worker."""
    parts = path.resolve().relative_to(TESTS).parts
    if parts[0] in ("system", "faults"):
        return parts[0]
    if parts[0] == "multiproc":
        return f"multiproc/{path.stem}"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = group_of(Path(str(item.path)))
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(name=group))
