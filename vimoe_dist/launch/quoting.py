"""Values a user types (option values, paths, overrides, environment entries) on their way into a batch script, an
`#SBATCH` line or a command line: each is checked against what its reader accepts, or quoted so the reader sees
data and never code.

The readers, and what they do with a value:
- bash, running the sbatch script or a printed command line: every value goes through `shlex.quote`.
- sbatch, reading `#SBATCH` lines (`_get_argument` in Slurm's src/sbatch/opt.c): it splits on whitespace, groups
  single- or double-quoted text, drops a backslash before any character, and ends the line at an unquoted `#`.
  `sbatch_word` double-quotes a value with `\\` before `"` and `\\`, so sbatch reads back exactly the value. bash
  sees these lines as comments, which is why a newline is the one character that would turn a value into code.
- DeepSpeed's pdsh runner: see `vimoe_dist.launch.pdsh`.

Control characters (newline, NUL, tab, escape, ...) are refused in every value: a newline ends an `#SBATCH` line
and starts a shell command, NUL cannot be passed in argv at all, and none belongs in a name, path or option.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

from vimoe_dist.errors import UserError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# characters sbatch and bash both read as themselves outside quotes
_PLAIN = re.compile(r"[\w@%+=:,./~-]+")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Slurm names: partitions, accounts, QOS (comma lists where Slurm takes them)
SLURM_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
SLURM_NAME_LIST = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*")
# --mem: a number of megabytes or a number with the unit K, M, G or T (`man sbatch`)
SLURM_MEM = re.compile(r"\d+[KMGTkmgt]?")
# --constraint: feature names joined by & | , with [ ] ( ) for sets and *N for counts (`man sbatch`), no spaces
SLURM_CONSTRAINT = re.compile(r"[A-Za-z0-9_.:=+\-&|,*\[\]()!]+")
# an sbatch option name given without dashes to --sbatch (exclusive, mail-type, ...)
SBATCH_OPTION = re.compile(r"[a-z][a-z0-9-]*")
# a host name or IPv4 address (RFC 1123 labels, underscores tolerated as sites use them); never a leading '-',
# which ssh would read as an option (`-oProxyCommand=...`)
HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def one_line(what: str, value: str) -> str:
    """`value` if it has no control character, else a one-line `UserError` naming `what`."""
    if _CONTROL.search(value):
        raise UserError(f"{what} {value!r}: contains a control character (newline, NUL, tab, ...); give it on one line")
    return value


def all_one_line(what: str, values: Iterable[str]) -> None:
    for value in values:
        one_line(what, value)


def matching(what: str, value: str, pattern: re.Pattern[str], expected: str) -> str:
    """`value` if all of it matches `pattern`, else a one-line `UserError` saying what was `expected`."""
    one_line(what, value)
    if not pattern.fullmatch(value):
        raise UserError(f"{what} {value!r}: expected {expected}")
    return value


def sbatch_word(value: str) -> str:
    """`value` written so that sbatch's `#SBATCH` parser reads it back unchanged: plain when it is plain, else in
    double quotes with `"` and `\\` escaped (inside quotes sbatch still drops a backslash before any character and
    reads `#` and whitespace as text)."""
    one_line("an #SBATCH value", value)
    if _PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def slurm_filename(path: str) -> str:
    """A directory for sbatch's `--output` pattern, where `%` starts a replacement (`%j` the job id): `%%` is a
    literal percent sign (`man sbatch`, filename pattern)."""
    return path.replace("%", "%%")


def export_line(name: str, value: str) -> str:
    """`export NAME='value'` for bash: the name checked, the value quoted."""
    split_env_entry(f"{name}={value}", value_required=True)
    return f"export {name}={shlex.quote(value)}"


def split_env_entry(entry: str, *, value_required: bool) -> tuple[str, str | None]:
    """`NAME=VALUE` -> (NAME, VALUE); `NAME` -> (NAME, None) unless a value is required. Messages name the
    variable, never its value (it may be a secret).

    Raises:
        UserError: a bad name, a missing value, or a control character in either.
    """
    name, sep, value = entry.partition("=")
    expected = "NAME=VALUE" if value_required else "NAME or NAME=VALUE"
    if not ENV_NAME.fullmatch(name) or (value_required and not sep):
        rule = "NAME: letters, digits and _, not starting with a digit"
        raise UserError(f"--env {name[:40]!r}: expected {expected} ({rule})")
    if _CONTROL.search(value):
        raise UserError(f"--env {name}: its value has a control character (newline, NUL, ...); give it on one line")
    return name, (value if sep else None)
