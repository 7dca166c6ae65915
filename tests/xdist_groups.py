"""A pytest plugin (`-p xdist_groups`, from the Makefile) that puts each multi-process module in an xdist group of its
own, so that its module-scoped jobs (test_reshard's four torchrun jobs, the layout runs, the trainer's runs) run
once, on one worker, instead of once on each worker that takes some of its tests.

The hook runs first (`tryfirst`): xdist reads the marks in its own collection hook. System and fault tests are left
ungrouped: grouping them too (measured 2026-12-06) ran the fault suite serially on one worker and was slower than
the duplicated fixtures it saved."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def group_of(path: Path) -> str | None:
    """The xdist group of a test file, or None for a test that can run on any worker."""
    parts = path.resolve().relative_to(TESTS).parts
    if parts[0] == "multiproc":
        return f"multiproc/{path.stem}"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = group_of(Path(str(item.path)))
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(name=group))
