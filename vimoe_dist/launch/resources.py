"""The files that ship inside the package: the sbatch templates (`templates/`) and the Prometheus and Grafana files
(`monitoring/`), read through `importlib.resources` so that an installed wheel finds them wherever it is.

    vimoe launch slurm --print --config ...             # the shipped template `vimoe`
    vimoe launch slurm --template my.sbatch.tmpl ...    # a file of one's own, with the same {{placeholders}}
    vimoe launch monitoring --out DIR                   # prometheus.yml, alerts.yml, the dashboard, into DIR
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from vimoe_dist.errors import UserError
from vimoe_dist.launch.quoting import one_line

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

TEMPLATE_SUFFIX = ".sbatch.tmpl"
DEFAULT_TEMPLATE = "vimoe"
MONITORING_FILES = ("prometheus.yml", "alerts.yml", "grafana-dashboard.json", "README.md")
# the file_sd directory prometheus.yml reads; `vimoe launch monitoring --sd-dir` writes another one in its place
DEFAULT_SD_DIR = "/shared/prometheus/vimoe"


def _package_dir(name: str) -> Traversable:
    return files("vimoe_dist.launch").joinpath(name)


def template_names() -> list[str]:
    """The shipped templates by name (`vimoe` for `templates/vimoe.sbatch.tmpl`)."""
    return sorted(
        entry.name.removesuffix(TEMPLATE_SUFFIX)
        for entry in _package_dir("templates").iterdir()
        if entry.name.endswith(TEMPLATE_SUFFIX)
    )


def load_template(name_or_path: str | None = None) -> str:
    """The text of a shipped template (by name, with or without its suffix) or of a template file (a path with a
    directory part or an existing file).

    Raises:
        UserError: a name that is not shipped, or a file that cannot be read.
    """
    name_or_path = one_line("--template", name_or_path or DEFAULT_TEMPLATE)
    shipped = name_or_path.removesuffix(TEMPLATE_SUFFIX)
    if shipped in template_names():
        return _package_dir("templates").joinpath(shipped + TEMPLATE_SUFFIX).read_text()
    path = Path(name_or_path)
    if "/" not in name_or_path and not path.is_file():
        raise UserError(
            f"--template {name_or_path!r}: no such shipped template ({', '.join(template_names())}) "
            "and no such file (give a path to use a template of your own)"
        )
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--template {name_or_path!r}: {getattr(e, 'strerror', None) or e}") from None


def monitoring_text(name: str) -> str:
    """One of MONITORING_FILES."""
    if name not in MONITORING_FILES:
        raise UserError(f"no monitoring file {name!r} (shipped: {', '.join(MONITORING_FILES)})")
    return _package_dir("monitoring").joinpath(name).read_text()


def write_monitoring(out: Path, sd_dir: str | None = None, *, force: bool = False) -> list[Path]:
    """Copies the monitoring files into `out`; with `sd_dir`, prometheus.yml reads the targets from that directory
    (the `--prometheus-sd-dir` of `vimoe launch slurm`).

    Raises:
        UserError: a file that exists already (without `force`), or one that cannot be written.
    """
    targets = [out / name for name in MONITORING_FILES]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise UserError(f"{', '.join(existing)} exist(s) already; pass --force to overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path in targets:
            text = monitoring_text(path.name)
            if path.name == "prometheus.yml" and sd_dir is not None:
                pattern = json.dumps(f"{one_line('--sd-dir', sd_dir).rstrip('/')}/*.json")  # JSON strings are YAML
                text = text.replace(f'"{DEFAULT_SD_DIR}/*.json"', pattern)
            path.write_text(text)
    except OSError as e:
        raise UserError(f"cannot write the monitoring files into {out}: {e.strerror}") from None
    return targets
