"""Caches under any uid (vimoe_dist/caches.py): the situation of a container run by enroot, apptainer or `docker run
--user` is made here with a HOME that cannot hold a directory (a path below a regular file), since tests run as root
and permission bits would not stop them."""

from __future__ import annotations

import os
import subprocess
import sys

from vimoe_dist.caches import CACHE_VARS, ensure_writable_caches


def test_an_unwritable_home_sends_every_cache_to_a_private_directory(tmp_path):
    (tmp_path / "file").write_text("")
    env = {"HOME": str(tmp_path / "file" / "home"), "MPLCONFIGDIR": str(tmp_path / "mine")}
    chosen = ensure_writable_caches(env)
    assert set(chosen) == {"TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR"}  # the one the user set is kept
    assert env["MPLCONFIGDIR"] == str(tmp_path / "mine")
    root = os.path.dirname(chosen["TORCH_EXTENSIONS_DIR"])
    assert os.path.basename(root).startswith(f"vimoe-{os.getuid()}")
    assert os.stat(root).st_uid == os.getuid() and os.stat(root).st_mode & 0o077 == 0  # private to this uid
    for var in chosen:
        os.makedirs(env[var], exist_ok=True)
        assert os.access(env[var], os.W_OK)


def test_a_writable_home_changes_nothing(tmp_path):
    env = {"HOME": str(tmp_path)}
    assert ensure_writable_caches(env) == {} and set(env) == {"HOME"}
    env = {"HOME": str(tmp_path / "x"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert ensure_writable_caches(env) == {}


def test_the_cli_sets_them_before_anything_loads(tmp_path):
    (tmp_path / "file").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in (*CACHE_VARS, "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path / "file" / "home")
    code = "import os, sys; from vimoe_dist.cli import main; sys.argv = ['vimoe', 'config', 'list']\n"
    code += "try:\n    main()\nexcept SystemExit:\n    print(os.environ['TORCH_EXTENSIONS_DIR'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"vimoe-{os.getuid()}" in out.stdout.splitlines()[-1]
