"""DeepSpeed hostfiles: one `host slots=N` line per node, `#` comments and blank lines ignored.

The deepspeed launcher reads the file itself (`deepspeed/launcher/runner.py`, `_parse_hostfile`); we parse it first
with the same rules so a typo is reported as one line naming the file and line before any ssh or pdsh starts, and so
`vimoe launch hostfile` can print the world size it is about to start. Host names are checked too: the runner
passes them to ssh and pdsh as arguments, where a name like `-oProxyCommand=...` would be read as an option.
"""

from __future__ import annotations

import re
from pathlib import Path

from vimoe_dist.errors import UserError
from vimoe_dist.launch.quoting import HOST

_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*(?:#.*)?$")


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """Reads a DeepSpeed hostfile into {host: slots}, in file order.

    Raises:
        UserError: a missing file, a line that is not `host slots=N`, zero slots, a repeated host, or no hosts.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"hostfile {path}: {e.strerror}") from None
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise UserError(f"hostfile {path}:{number}: expected 'host slots=N', got {line!r}")
        host, slots = match.group(1), int(match.group(2))
        if not HOST.fullmatch(host):
            raise UserError(f"hostfile {path}:{number}: {host!r} is not a host name (letters, digits, '.', '-', '_')")
        if slots < 1:
            raise UserError(f"hostfile {path}:{number}: host {host} has slots={slots}, needs at least 1")
        if host in hosts:
            raise UserError(f"hostfile {path}:{number}: host {host} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise UserError(f"hostfile {path}: no 'host slots=N' lines")
    return hosts
