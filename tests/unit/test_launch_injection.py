"""Hostile values for every string option of every launcher: each is refused with one line (exit 2), or rendered so
that what reads it sees data. The rendered sbatch scripts and the printed command lines then run under a real bash
with fake `srun`, `scontrol`, `sbatch`, `pdsh`, `ssh` and `python` first on PATH (tests/launch_fakes.py; there is
no Slurm or pdsh here), and the payloads, which all try to create a marker file, must never create it. The
`#SBATCH` lines are read back with sbatch's own rules, and `vimoe launch hostfile` runs the real deepspeed runner
over a fake pdsh that hands the remote command to bash, as ssh does.

(Integer options are parsed by argparse and never reach a script; they are left out.)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from launch_fakes import calls, make_fake_bin, srun_env
from support import data_yaml, run_cli

PAYLOADS = [
    "$(touch {m})",
    "`touch {m}`",
    "x;touch {m}",
    "x' ; touch {m} ; '",
    'x" ; touch {m} ; "',
    "x\ntouch {m}",
    "x\\\n touch {m}",
    "x && touch {m} #",
    "a b\\",
    'a b\\" ; touch {m} ; \\"',
    "{a,b}$(touch {m})",
    "-oProxyCommand=touch {m}",
    "# x\ntouch {m}",
    "$'\\ntouch {m}'",
    "x\x00touch {m}",
]

SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_NTASKS": "1"}


def sbatch_arguments(line: str) -> list[str]:
    """The arguments sbatch reads from one `#SBATCH` line (Slurm src/sbatch/opt.c, `_get_argument`): split on
    whitespace, quotes group, a backslash escapes the next character anywhere, an unquoted `#` ends the line."""
    args, i, n = [], 0, len(line)
    while True:
        while i < n and line[i].isspace():
            i += 1
        if i >= n:
            return args
        arg, quote, escaped = [], "", False
        while i < n and (quote or not line[i].isspace()):
            c = line[i]
            i += 1
            if escaped:
                arg.append(c)
                escaped = False
            elif c == "\\":
                escaped = True
            elif quote:
                if c == quote:
                    quote = ""
                else:
                    arg.append(c)
            elif c in "\"'":
                quote = c
            elif c == "#":
                return [*args, "".join(arg)] if arg else args
            else:
                arg.append(c)
        assert not quote, f"unbalanced quote in {line!r}"
        args.append("".join(arg))


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(f"run:\n  out_dir: {tmp_path / 'run'}\ntrain:\n  steps: 5\n{data_yaml(tmp_path / 'data')}")
    fake_env = make_fake_bin(tmp_path / "fakes")
    return config, tmp_path / "MARK", {**os.environ, **fake_env}


def hostile(payload: str, marker: Path) -> str:
    return payload.replace("{m}", str(marker))


def hostile_cases(options: dict[str, str], marker: Path) -> list[tuple[str, str, str]]:
    """(option, payload, value) for each option and payload; `options` maps an option to a value pattern."""
    return [
        (option, payload, pattern.replace("{p}", hostile(payload, marker)))
        for option, pattern in options.items()
        for payload in PAYLOADS
    ]


def config_named(tmp_path: Path, payload: str) -> Path | None:
    """A valid config file whose name carries the payload, where the file system allows the name."""
    name = payload.replace("{m}", "MARK").replace("/", "_").replace("\x00", "")
    path = tmp_path / f"c-{name}.yaml"
    try:
        path.write_text(f"run:\n  out_dir: {tmp_path / 'run'}\n{data_yaml(tmp_path / 'data')}")
    except OSError:
        return None
    return path


def check_one_line_refusal(code: int, out: str, err: str, context: str) -> None:
    assert code == 2, context
    assert out == "" and err.count("\n") == 1 and err.startswith("vimoe launch: error: "), (context, err)


# ---- Slurm ---------------------------------------------------------------------------------------------------

SLURM_OPTIONS = {
    "--partition": "{p}", "--account": "{p}", "--qos": "{p}", "--time": "{p}", "--constraint": "{p}",
    "--mem": "{p}", "--job-name": "{p}", "--sbatch=mail-user": "{p}", "--sbatch": "{p}", "--env=X": "{p}",
    "--env": "{p}", "--srun-arg=--comment": "{p}", "--srun-arg": "{p}", "--log-dir": "{p}", "--workdir": "{p}",
    "--python": "python {p}", "--container-image": "{p}", "--container-opt=container-mounts": "{p}",
    "--container-opt": "{p}", "--prometheus-sd-dir": "{p}", "--template": "{p}", "override": "metrics.job={p}",
    "override:out_dir": "run.out_dir={p}",
}  # fmt: skip


def slurm_argv(option: str, value: str, config: Path) -> list[str]:
    base = ["launch", "slurm", "--cpus-per-task", "1"]
    if option.startswith("override"):
        return [*base, "--config", str(config), "metrics.port=9500", value]
    flag, _, prefix = option.partition("=")
    extra = ["--container-image", "img"] if flag == "--container-opt" else []
    return [*base, *extra, f"{flag}={prefix}={value}" if prefix else f"{flag}={value}", "--config", str(config),
            "metrics.port=9500"]  # fmt: skip


@pytest.mark.slow
def test_hostile_slurm_options_are_refused_or_stay_data(setup, tmp_path, capsys):
    config, marker, env = setup
    rendered = 0
    for option, _, value in hostile_cases(SLURM_OPTIONS, marker):
        context = f"{option} {value!r}"
        code, script, err = run_cli(slurm_argv(option, value, config), capsys)
        if code != 0:
            check_one_line_refusal(code, script, err, context)
            continue
        rendered += 1
        for line in script.splitlines():
            if line.startswith("#SBATCH "):
                args = sbatch_arguments(line.removeprefix("#SBATCH"))
                assert len(args) == 1 and args[0].startswith("--"), (context, line)
        path = tmp_path / "job.sbatch"
        path.write_text(script)
        result = subprocess.run(["bash", str(path)], env={**env, **SLURM_ENV}, capture_output=True, timeout=60)
        assert not marker.exists(), (context, script)
        assert result.returncode == 0, (context, result.stderr)
    assert rendered > 50  # paths, free-form values and the command took the payloads as data


@pytest.mark.slow
def test_hostile_values_reach_the_slurm_job_intact(setup, tmp_path, capsys):
    """Where a payload is accepted, sbatch reads the very value back from its #SBATCH line and srun gets it as one
    argument or variable."""
    config, marker, env = setup
    accepted = 0
    for payload in PAYLOADS:
        value = hostile(payload, marker)
        if "\n" in value or "\x00" in value:
            continue
        argv = ["launch", "slurm", "--cpus-per-task", "1", f"--env=X={value}", f"--log-dir={tmp_path / value}",
                f"--sbatch=mail-user={value}", "--config", str(config), f"metrics.job={value}"]  # fmt: skip
        code, script, err = run_cli(argv, capsys)
        if code != 0:  # metrics.job is YAML: a value starting with ` or { is not a string
            check_one_line_refusal(code, script, err, value)
            assert "metrics.job" in err
            continue
        accepted += 1
        directives = [sbatch_arguments(x.removeprefix("#SBATCH"))[0] for x in script.splitlines() if x[:7] == "#SBATCH"]
        assert f"--mail-user={value}" in directives
        output = f"--output={tmp_path / value}/%x-%j.out".replace("%", "%%").replace("%%x-%%j", "%x-%j")
        assert output in directives
        (tmp_path / "job.sbatch").write_text(script)
        subprocess.run(["bash", str(tmp_path / "job.sbatch")], env={**env, **SLURM_ENV}, check=True, timeout=60)
        assert calls(tmp_path / "fakes", "srun")[-1][-1] == f"metrics.job={value}"
        assert srun_env(tmp_path / "fakes")["X"] == value
        assert not marker.exists()
    assert accepted >= 8


# ---- local and hostfile: the printed command lines -------------------------------------------------------------

LOCAL_OPTIONS = {"--python": "python {p}", "override": "metrics.job={p}", "config": "{p}"}
HOSTFILE_OPTIONS = {
    "--python": "python {p}", "override": "metrics.job={p}", "config": "{p}", "--hostfile": "{p}",
    "--include": "{p}", "--exclude": "{p}", "--master-addr": "{p}", "--backend": "{p}", "--backend-args": "{p}",
    "--env=X": "{p}", "--env": "{p}",
}  # fmt: skip


def command_argv(form: str, option: str, value: str, payload: str, tmp_path: Path, config: Path) -> list[str] | None:
    """`vimoe launch FORM --dry-run` with `option` set to `value`; the interpreter is the fake `python`."""
    python = value if option == "--python" else "python"
    if form == "local":
        argv = ["launch", "local", "--nproc", "1", "--dry-run", "--python", python]
    else:
        hostfile = tmp_path / "hosts"
        if option == "--hostfile":
            hostfile = tmp_path / f"h-{payload.replace('{m}', 'MARK').replace('/', '_').replace(chr(0), '')}"
        hostfile.write_text("node1 slots=1\n")
        argv = ["launch", "hostfile", "--hostfile", str(hostfile), "--dry-run", "--no-ssh", "--node-rank", "0",
                "--python", python]  # fmt: skip
        if option != "--master-addr":
            argv += ["--master-addr", "node1"]
    if option == "config":
        named = config_named(tmp_path, payload)
        return None if named is None else [*argv, "--config", str(named)]
    if option == "override":
        return [*argv, "--config", str(config), value]
    if option in ("--python", "--hostfile"):
        return [*argv, "--config", str(config)]
    flag, _, prefix = option.partition("=")
    return [*argv, f"{flag}={prefix}={value}" if prefix else f"{flag}={value}", "--config", str(config)]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["local", "hostfile"])
def test_hostile_command_line_options_are_refused_or_stay_data(setup, tmp_path, capsys, monkeypatch, form):
    config, marker, env = setup
    monkeypatch.setenv("X", "$(touch " + str(marker) + ")")  # what `--env X` forwards
    options = LOCAL_OPTIONS if form == "local" else HOSTFILE_OPTIONS
    printed = 0
    for option, payload, value in hostile_cases(options, marker):
        argv = command_argv(form, option, value, payload, tmp_path, config)
        if argv is None:
            continue
        context = f"{form} {option} {value!r}"
        code, out, err = run_cli(argv, capsys)
        if code != 0:
            check_one_line_refusal(code, out, err, context)
            continue
        printed += 1
        result = subprocess.run(["bash", "-c", out], env=env, capture_output=True, text=True, timeout=60)
        assert not marker.exists(), (context, out)
        assert result.returncode == 0 and calls(tmp_path / "fakes", "python")[-1] == shlex.split(out)[1:], context
    assert printed > 10


# ---- hostfile over pdsh: the real deepspeed runner ---------------------------------------------------------------


@pytest.mark.slow
def test_pdsh_launch_puts_no_user_value_through_the_remote_shell(setup, tmp_path):
    """`vimoe launch hostfile` for real: the deepspeed runner builds its pdsh command, the fake pdsh runs it in bash
    as each node's shell would (with the fake python in place of the interpreter). Hostile overrides and `--env`
    values stay out of it, in the job file, and arrive intact; nothing runs."""
    config, marker, env = setup
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    values = [hostile(p, marker) for p in PAYLOADS]
    values = [v for v in values if "\n" not in v and "\x00" not in v]
    overrides = [f"metrics.job={v}" for v in values[:1]] + ["data.train=/d/train-{000000..000009}.tar"]
    # MLFLOW_*: DeepSpeed would export these through the remote shell if they were in its environment
    env_args = [f"--env=MLFLOW_V{i}={v}" for i, v in enumerate(values)]
    argv = [sys.executable, "-m", "vimoe_dist", "launch", "hostfile", "--hostfile", str(hostfile), "--master-addr",
            "node1", "--master-port", "29561", "--no-data-check", *env_args, "--config", str(config),
            *overrides]  # fmt: skip
    result = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not marker.exists()
    assert not any(v in result.stdout + result.stderr for v in values[1:])  # --env values are never shown
    remote = calls(tmp_path / "fakes", "python")
    job_file = str(tmp_path / "run" / "launch" / "job.json")
    assert len(remote) == 2 and all(
        r[-2:] == ["vimoe_dist.launch.jobspec", job_file] and "--module" in r for r in remote
    )
    assert sorted(a for r in remote for a in r if a.startswith("--node_rank=")) == ["--node_rank=0", "--node_rank=1"]
    job = json.loads(Path(job_file).read_text())
    assert job["argv"] == ["train", "--config", str(config), *overrides]
    assert job["env"] == {f"MLFLOW_V{i}": v for i, v in enumerate(values)}


def test_values_deepspeed_would_pass_through_the_remote_shell_are_refused(setup, tmp_path, capsys, monkeypatch):
    config, marker, _ = setup
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    argv = ["launch", "hostfile", "--hostfile", str(hostfile), "--master-addr", "node1", "--dry-run",
            "--config", str(config)]  # fmt: skip
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", f"ib0$(touch {marker})")
    code, out, err = run_cli(argv, capsys)
    check_one_line_refusal(code, out, err, "NCCL_*")
    assert "NCCL_SOCKET_IFNAME" in err
    monkeypatch.delenv("NCCL_SOCKET_IFNAME")
    (tmp_path / ".deepspeed_env").write_text("A=1\nB\n")
    code, out, err = run_cli(argv, capsys)
    check_one_line_refusal(code, out, err, ".deepspeed_env")
    assert ".deepspeed_env:2" in err
    (tmp_path / ".deepspeed_env").unlink()
    odd = tmp_path / "odd dir;x"
    odd.mkdir()
    monkeypatch.chdir(odd)
    code, out, err = run_cli(argv, capsys)
    check_one_line_refusal(code, out, err, "cwd")
    assert "the current directory" in err


@pytest.mark.parametrize("form", ["hostfile", "slurm"])
@pytest.mark.parametrize("how", ["value", "forwarded"])
def test_a_newline_in_an_env_value_never_adds_a_variable(setup, tmp_path, capsys, monkeypatch, form, how):
    """`--env A=1<newline>LD_PRELOAD=...` (or a forwarded A holding it) would add a variable on every node where the
    value goes through a file or a script: there (the hostfile job file, a value rendered into the sbatch script) it
    is refused in one line naming the variable; where it stays an environment value (Slurm forwards it by name) it
    is never printed or written."""
    config, _, _ = setup
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=1\n")
    smuggled = f"1\nLD_PRELOAD={tmp_path / 'evil.so'}"
    monkeypatch.setenv("A", smuggled)
    env_arg = f"--env=A={smuggled}" if how == "value" else "--env=A"
    extra = {"hostfile": ["--hostfile", str(hostfile), "--dry-run"], "slurm": ["--print"]}[form]
    code, out, err = run_cli(["launch", form, *extra, env_arg, "--config", str(config)], capsys)
    if form == "hostfile" or (form, how) == ("slurm", "value"):
        check_one_line_refusal(code, out, err, f"{form} --env {how}")
        assert "--env A" in err and "LD_PRELOAD" not in out + err
    else:
        assert code == 0, err
        assert "LD_PRELOAD" not in out + err and "evil.so" not in out + err
