"""A pytest plugin (`-p xdist_groups`, from the Makefile) that marks tests with xdist groups: the system tests, the
fault tests and each multi-process module.

Known and measured (2026-12-06): this hook runs after xdist's own, which reads the marks, so today the marks do not
change the schedule. Tests spread over both workers, and a module's fixtures (test_reshard's jobs, the layout runs,
the fault suite's reference run) run once on each worker that takes some of its tests. That passed in 1,682 s for the
whole CI run on a clean clone. With `@pytest.hookimpl(tryfirst=True)` the groups take effect and the duplicates go,
but the grouped schedule was slower here (the fault group runs serially on one worker and the unit tests wait
behind the groups); measure both before changing it."""

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
