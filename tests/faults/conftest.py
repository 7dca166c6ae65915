"""Fixtures of the fault-injection suite: the digits shards, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from vimoe_dist.data import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out
