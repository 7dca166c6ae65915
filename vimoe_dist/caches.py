"""Cache directories that work under any uid.

torch's extension builds (DeepSpeed JIT-compiles the ops an image did not precompile), Triton's kernels and
matplotlib's font cache default to `$XDG_CACHE_HOME` or `~/.cache` (matplotlib: `~/.config`). In a container that
is often not writable: enroot/pyxis and apptainer run the image as the user, whose home may not exist inside it, and
`docker run --user UID` with a uid the image does not know gets HOME=/. Where the default cannot be created, each
cache goes to a private directory of this uid under the temp directory instead; a variable the user set is kept.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

CACHE_VARS = {"TORCH_EXTENSIONS_DIR": "torch_extensions", "TRITON_CACHE_DIR": "triton", "MPLCONFIGDIR": "matplotlib"}


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".vimoe-probe-"):
            return True
    except OSError:
        return False


def _private_root() -> Path:
    """`$TMPDIR/vimoe-UID`, made 0700; a fresh directory when another uid holds that name."""
    root = Path(tempfile.gettempdir()) / f"vimoe-{os.getuid()}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        if root.is_symlink() or root.stat().st_uid != os.getuid():
            raise PermissionError(root)
        return root
    except OSError:
        return Path(tempfile.mkdtemp(prefix=f"vimoe-{os.getuid()}-"))


def ensure_writable_caches(env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Points the unset cache variables at a writable directory when the default cache directory is not writable.

    Returns:
        The variables set (empty when the default location works or every variable was already set).
    """
    home_cache = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    unset = [var for var in CACHE_VARS if not env.get(var)]
    if not unset or _writable(Path(home_cache)):
        return {}
    root = _private_root()
    chosen = {var: str(root / CACHE_VARS[var]) for var in unset}
    env.update(chosen)
    return chosen
