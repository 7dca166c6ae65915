"""A pytest plugin (`-p xdist_groups`, from the Makefile) that marks tests with xdist groups: the system tests, the
fault tests and each multi-process module.

Known and measured (2026-12-06): under pytest 9 and pytest-xdist 3.8 xdist_group marks do not change the schedule
at all, static `pytestmark` ones included (a two-file example: a module marked as one group ran on both workers,
and its node ids carry no `@group` suffix), so `--dist loadgroup` behaves as `--dist load`, and a module's fixtures
(test_reshard's jobs, the layout runs, the fault suite's reference run) run once on each worker that takes some of
its tests. That schedule passed the whole clean-clone CI run in 1,705 s. `--dist loadfile` was tried and had a
failing test by the 90% mark; it was reverted before it was understood. Measure before changing this."""

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
