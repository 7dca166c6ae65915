"""Slurm hostlist expansion in pure Python. The expected lists were printed by `scontrol show hostnames` (Slurm
22.05); `tests/system/test_slurm_cluster.py` repeats the comparison against the real binary."""

from __future__ import annotations

import pytest

from vimoe_dist.errors import UserError
from vimoe_dist.launch.hostlist import expand_hostlist, expand_tasks_per_node, first_host

SCONTROL_GOLDEN = {
    "node[01-04,07]": ["node01", "node02", "node03", "node04", "node07"],
    "gpu-a[1-2]-b[3-4]": ["gpu-a1-b3", "gpu-a1-b4", "gpu-a2-b3", "gpu-a2-b4"],
    "n[8-10]": ["n8", "n9", "n10"],
    "n[08-10]": ["n08", "n09", "n10"],
    "n[9-011]": ["n9", "n10", "n11"],
    "n[001-3]": ["n001", "n002", "n003"],
    "n[00-0]": ["n00"],
    "x[007]": ["x007"],
    "a,b[1-2],c": ["a", "b1", "b2", "c"],
    "n[1-3,3]": ["n1", "n2", "n3", "n3"],
    "n[1-2],m[3-4]": ["n1", "n2", "m3", "m4"],
    "plain": ["plain"],
}


@pytest.mark.parametrize("expr", sorted(SCONTROL_GOLDEN))
def test_expand_matches_scontrol(expr):
    assert expand_hostlist(expr) == SCONTROL_GOLDEN[expr]


def test_first_host_is_first_of_expansion():
    for expr, hosts in SCONTROL_GOLDEN.items():
        assert first_host(expr) == hosts[0]


@pytest.mark.parametrize("expr", ["n[1-2", "n1-2]", "n[a-b]", "n[3-1]", "n[1-2]x", "n[[1]]", "n[1-]"])
def test_bad_hostlists_raise_user_error_naming_the_expression(expr):
    with pytest.raises(UserError, match="hostlist"):
        expand_hostlist(expr)


def test_huge_range_is_refused():
    with pytest.raises(UserError, match="more than"):
        expand_hostlist("n[1-100000000]")


@pytest.mark.parametrize(
    ("expr", "counts"),
    [("2", [2]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]), ("4,1(x2)", [4, 1, 1])],
)
def test_tasks_per_node(expr, counts):
    assert expand_tasks_per_node(expr) == counts


@pytest.mark.parametrize("expr", ["", "2x3", "2(3)", "a"])
def test_bad_tasks_per_node(expr):
    with pytest.raises(UserError, match="tasks-per-node"):
        expand_tasks_per_node(expr)
