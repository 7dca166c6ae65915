"""Stand-ins for the cluster tools the launchers call, for tests that run rendered scripts and printed command lines
under a real bash on a machine without Slurm, pdsh or ssh (the real ones run in tests/system/ on the test cluster).

Each fake is a small bash script in a `bin` directory to put first on PATH. Every fake appends its argv to
`LOG/<tool>.args` (the count, then each argument, NUL-terminated: any other byte may be in an argument), so a test
can check that a value arrived as one intact argument:

- `srun`: also writes the environment it was given to `LOG/srun.env` (`env -0`), then runs `$FAKE_SRUN_HOOK`
  (bash) if set; exits `$FAKE_SRUN_EXIT` (0).
- `scontrol`: `show hostnames` prints `node1`; anything else succeeds.
- `sinfo`: prints `$FAKE_SINFO`.
- `sbatch`: prints `$FAKE_SBATCH_OUT` (`4242;testcluster`), sleeps `$FAKE_SBATCH_SLEEP` seconds (0: a job that
  `--wait` waits for) and exits `$FAKE_SBATCH_EXIT` (0).
- `ssh`: succeeds (DeepSpeed's runner checks that the first host answers).
- `pdsh`: what pdsh over ssh does: joins the remote command with spaces and runs it in a shell (bash) for each
  host of `-w`, `%n` replaced by the host's index; the real interpreter's path in it is replaced by the fake
  `python`, so the remote command is parsed by a real shell but starts nothing.
- `python`: records argv and `$FAKE_ENV_NAMES` of its environment.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_RECORD = 'printf "%s\\0" "$#" "$@" >> "$FAKE_LOG/{tool}.args"'

SCRIPTS = {
    "srun": """
        {record}
        env -0 > "$FAKE_LOG/srun.env"
        if [ -n "${FAKE_SRUN_HOOK:-}" ]; then bash -c "$FAKE_SRUN_HOOK"; fi
        exit "${FAKE_SRUN_EXIT:-0}"
    """,
    "scontrol": """
        {record}
        if [ "$1" = show ] && [ "$2" = hostnames ]; then echo node1; fi
    """,
    "sinfo": """
        {record}
        printf '%s\\n' "${FAKE_SINFO:-}"
    """,
    "sbatch": """
        {record}
        echo "${FAKE_SBATCH_OUT-4242;testcluster}"
        trap 'kill "$!"; exit 143' TERM
        sleep "${FAKE_SBATCH_SLEEP:-0}" &
        wait "$!"
        exit "${FAKE_SBATCH_EXIT:-0}"
    """,
    "ssh": """
        {record}
    """,
    "pdsh": """
        {record}
        hosts=""
        while [ $# -gt 0 ]; do
            case "$1" in
                -S) shift ;;
                -f) shift 2 ;;
                -w) hosts="$2"; shift 2 ;;
                *) break ;;
            esac
        done
        remote="$*"
        remote="${remote//"$FAKE_PY_REAL"/"$FAKE_BIN/python"}"
        i=0
        for host in ${hosts//,/ }; do
            bash -c "${remote//%n/$i}" || exit $?
            i=$((i + 1))
        done
    """,
    "python": """
        {record}
        for name in ${FAKE_ENV_NAMES:-}; do printf '%s=%s\\n' "$name" "${!name-<unset>}"; done >> "$FAKE_LOG/python.env"
    """,
}


def make_fake_bin(root: Path) -> dict[str, str]:
    """Writes the fakes under `root/bin` and returns the variables that put them first on PATH (to lay over an
    environment: `{**os.environ, **make_fake_bin(root)}`)."""
    bin_dir, log = root / "bin", root / "log"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log.mkdir(exist_ok=True)
    for tool, body in SCRIPTS.items():
        record = _RECORD.format(tool=tool)
        text = "#!/bin/bash\n" + "\n".join(line[8:] for line in body.strip("\n").splitlines()) + "\n"
        path = bin_dir / tool
        path.write_text(text.replace("{record}", record))
        path.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_BIN": str(bin_dir),
        "FAKE_PY_REAL": sys.executable,
    }


def calls(root: Path, tool: str) -> list[list[str]]:
    """The argv of every call of `tool`, in order."""
    path = root / "log" / f"{tool}.args"
    if not path.exists():
        return []
    fields = path.read_bytes().decode(errors="surrogateescape").split("\0")[:-1]
    out, i = [], 0
    while i < len(fields):
        count = int(fields[i])
        out.append(fields[i + 1 : i + 1 + count])
        i += 1 + count
    return out


def srun_env(root: Path) -> dict[str, str]:
    """The environment of the last srun call."""
    entries = (root / "log" / "srun.env").read_bytes().decode(errors="surrogateescape").split("\0")[:-1]
    return dict(entry.split("=", 1) for entry in entries)
