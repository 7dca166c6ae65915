"""The wheel works outside the checkout: built from the package sources alone, installed into a fresh venv in a
temporary directory, and run there as a user would (`--version`, `data digits`, `config show`, `launch slurm`).

Installing torch and DeepSpeed again would take minutes and gigabytes, so the fresh venv borrows the packages of
the environment running the tests through a `.pth` line naming its site-packages. A directory named in a `.pth`
file is put on sys.path but its own `.pth` files are not run, so the editable install of the checkout (a `.pth`
import hook there) stays off; the test checks that `vimoe_dist` comes from the wheel and that nothing of the
checkout is on sys.path. The wheel is installed with --no-deps, and its declared dependencies are then checked
against what the venv sees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

PROBE = r"""
import json, sys
from importlib.metadata import distribution, version
from packaging.requirements import Requirement
import vimoe_dist
unmet = []
for text in distribution("vimoe-dist").requires or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra's requirement
    try:
        have = version(req.name)
    except Exception:
        unmet.append(f"{req}: not installed")
        continue
    if not req.specifier.contains(have, prereleases=True):
        unmet.append(f"{req}: {have} installed")
print(json.dumps({"file": vimoe_dist.__file__, "path": sys.path, "unmet": unmet}))
"""


def sh(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(the fresh venv, an environment that runs it, a working directory outside the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # the package sources alone: nothing else of the checkout can end up in the wheel
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "vimoe_dist", src / "vimoe_dist", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = sh(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)], root, env
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("vimoe_dist-*.whl")

    fresh = root / "venv"
    made = sh([sys.executable, "-m", "venv", "--without-pip", str(fresh)], root, env)
    assert made.returncode == 0, made.stderr
    python = fresh / "bin" / "python"
    # installed before the .pth exists: pip then sees an empty venv and never touches the borrowed packages
    installed = sh([*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)], root, env)
    assert installed.returncode == 0, installed.stderr
    site = Path(
        sh([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env).stdout.strip()
    )
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_borrowed_packages.pth").write_text("".join(f"{p}\n" for p in sorted(borrowed)))

    env["PATH"] = f"{fresh / 'bin'}{os.pathsep}{env['PATH']}"
    work = root / "work"
    work.mkdir()
    return fresh, env, work


def test_the_installed_wheel_is_what_runs(venv):
    fresh, env, work = venv
    probe = sh([str(fresh / "bin" / "python"), "-c", PROBE], work, env)
    assert probe.returncode == 0, probe.stderr
    info = json.loads(probe.stdout)
    assert Path(info["file"]).is_relative_to(fresh), info["file"]
    entries = [Path(p) for p in info["path"] if p]
    # the borrowed dependencies may live in the checkout's .venv (make test puts it there); nothing else of it may
    borrowed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    inside = [p for p in entries if p.resolve().is_relative_to(REPO.resolve()) and p.resolve() not in borrowed]
    assert not inside, info["path"]
    others = [p for p in entries if (p / "vimoe_dist").exists() and not p.is_relative_to(fresh)]
    assert not others, f"another vimoe_dist is importable from {others}"
    assert info["unmet"] == [], info["unmet"]  # every declared dependency is satisfied


def test_the_commands_work_outside_the_checkout(venv):
    fresh, env, work = venv
    vimoe = str(fresh / "bin" / "vimoe")

    result = sh([vimoe, "--version"], work, env)
    assert result.returncode == 0 and result.stdout.strip().startswith("vimoe-dist "), result.stderr

    result = sh([vimoe, "data", "digits", "--out", "data/digits"], work, env)
    assert result.returncode == 0, result.stderr
    assert (work / "data" / "digits" / "train.json").is_file()

    result = sh([vimoe, "config", "show", "--config", "digits", "--nproc", "2"], work, env)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["model"]["moe"]["num_experts"] == 4
    assert "#   train set:               1,437 images in 12 shards" in result.stdout

    result = sh([vimoe, "config", "show", "--config", "nope"], work, env)
    assert result.returncode == 2 and "shipped: digits," in result.stderr


def test_launch_slurm_prints_a_script_outside_the_checkout(venv):
    """Needs the sbatch template shipped as package data (vimoe_dist/launch/templates/, declared in pyproject)."""
    fresh, env, work = venv
    argv = [str(fresh / "bin" / "vimoe"), "launch", "slurm", "--print", "--nodes", "1", "--gpus-per-node", "2",
            "--no-data-check"]  # fmt: skip
    result = sh([*argv, "--config", "digits"], work, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("#!/bin/bash") and "--config digits" in result.stdout
