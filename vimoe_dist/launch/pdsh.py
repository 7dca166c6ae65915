"""What DeepSpeed's pdsh runner sends through a remote shell, and the checks that keep it data.

`deepspeed.launcher.runner --launcher pdsh` (deepspeed/launcher/multinode_runner.py, `PDSHRunner.get_cmd`) joins
one command with spaces, and pdsh runs it over ssh in each node's login shell:

    export NAME=VALUE; ...; cd CWD; PYTHON -u -m deepspeed.launcher.launch --world_info=... --node_rank=%n
        --master_addr=ADDR --master_port=PORT --no_local_rank --module MODULE ARGS...

- Exported values (`MultiNodeRunner.add_export`): the launching environment's variables whose names start with
  MLFLOW, PYTHON, MV2 or UCX (`EXPORT_ENVS` in runner.py) or the CUDA accelerator's NCCL, PYTHONPATH with the
  current directory put in front, and each line of DS_ENV_FILE (default `.deepspeed_env` in the home and current
  directories). A value is stripped, and put in double quotes when it has a character outside `[\\w@%+=:,./-]`,
  with nothing escaped inside: `$(...)`, a backtick, `"` or `\\` in a value runs or breaks on every node, and a
  newline in DS_ENV_FILE adds variables (`LD_PRELOAD=...`).
- `cd CWD` and `--master_addr=ADDR` are bare words.
- ARGS (`PDSHRunner.parse_user_args`): bare when without a space, else in double quotes with only `"` escaped, so
  `$(...)`, a backtick, `{a,b}` or `*` in a config path or an override is expanded by the remote shell.

`vimoe launch hostfile` therefore never hands a user's argument or `--env` value to the runner: they travel in a
job file (`vimoe_dist.launch.jobspec`), and the remote command holds fixed words and that file's path. What is
left is the user's own launching environment and directory, checked here: a value the remote shell would not read
as data is refused in one line naming it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from vimoe_dist.errors import UserError

# DeepSpeed's runner forwards variables with these name prefixes (runner.py EXPORT_ENVS, CUDA's export_envs())
FORWARDED_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")
# what add_export leaves unquoted, hence what the remote shell must read as itself
_BARE = re.compile(r"[\w@%+=:,./-]+")
# what stays special inside double quotes: expansion, command substitution, the closing quote, escapes
_ACTIVE_IN_DOUBLE_QUOTES = re.compile(r"[$`\"\\\x00-\x1f\x7f]")


def bare_word(what: str, value: str) -> str:
    """`value` if the remote shell reads it unquoted as itself, else a one-line `UserError`."""
    if not _BARE.fullmatch(value):
        raise UserError(
            f"{what} {value!r}: the pdsh backend passes it unquoted to each node's shell; "
            "use only letters, digits and @%+=:,./-"
        )
    return value


def check_export(name: str, value: str, source: str) -> None:
    """A variable DeepSpeed will export on every node through the remote shell."""
    if _ACTIVE_IN_DOUBLE_QUOTES.search(value):
        raise UserError(
            f"{source} {name}={value!r}: DeepSpeed's pdsh runner exports it to every node in double quotes, where "
            '$, `, " and \\ are still shell syntax; unset it or change the value'
        )


def check_runner_environment(environ: Mapping[str, str], cwd: str, home: str | None = None) -> None:
    """Checks what the pdsh runner will put through each node's shell besides vimoe's own fixed words: the
    forwarded variables of `environ`, PYTHONPATH as the runner rewrites it, the DS_ENV_FILE lines and `cwd`.

    Raises:
        UserError: the first value the remote shell would read as code, or a DS_ENV_FILE line the runner cannot
            parse (it would stop with a traceback).
    """
    bare_word("the current directory", cwd)
    for name, value in environ.items():
        if name.startswith(FORWARDED_PREFIXES) and name != "PYTHONPATH":
            check_export(name, value, "the environment variable")
    python_path = f"{cwd}:{environ['PYTHONPATH']}" if "PYTHONPATH" in environ else cwd
    check_export("PYTHONPATH", python_path, "the environment variable (with the current directory in front)")
    env_file_name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    for directory in (home if home is not None else os.path.expanduser("~"), cwd):
        path = Path(directory) / env_file_name
        if path.is_file():
            _check_env_file(path)


def _check_env_file(path: Path) -> None:
    try:
        lines = path.read_text().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} (read by DeepSpeed's runner): {e}") from None
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise UserError(f"{path}:{number}: expected NAME=VALUE (DeepSpeed's runner reads every line)")
        check_export(name.strip(), value.strip(), f"{path}:{number}:")
