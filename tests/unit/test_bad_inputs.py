"""Bad configs and command lines across the CLI (`vimoe train`, `eval`, `launch`, `data`), table-driven: each case
must exit non-zero with one line on stderr naming the key or file, before any work starts, and with no traceback.

Every case runs as its own process through the real entry point (`vimoe_dist.cli.main`, what the `vimoe` script
calls). Starting a fresh interpreter per case costs 10-30 s here (torch, timm and DeepSpeed imports), so this file
doubles as a driver: one subprocess imports the heavy modules once, then forks a child per case; each child has its
own environment, stdout/stderr and exit code, exactly like a separate `vimoe` call. Two cases also run through a
plain `python -m vimoe_dist` to check that the driver does not hide anything the real interpreter start would show.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CASE_TIMEOUT_S = 120


# ---------------------------------------------------------------------------------------------------- driver


def _drive(cases: list[dict]) -> list[dict]:
    """Runs in the driver process: import once, then fork one child per case."""
    import importlib

    # imported before forking, so that no child pays for them
    for name in ("torch", "timm", "deepspeed", "vimoe_dist.model", "vimoe_dist.parallel.init", "vimoe_dist.metrics",
                 "vimoe_dist.train.loop", "vimoe_dist.data", "vimoe_dist.launch.cli"):  # fmt: skip
        importlib.import_module(name)
    import torch

    if not torch.cuda.is_available():  # DeepSpeed's CPU op, JIT-built on first use: once, before the children
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        ShareMemCommBuilder().load()
    import vimoe_dist.cli

    results = []
    for i, case in enumerate(cases):
        out_path = Path(case["log"])
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: one `vimoe` call
            code = 1
            try:
                fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                for key in case.get("unset", []):
                    os.environ.pop(key, None)
                os.environ.update(case.get("env", {}))
                os.chdir(case.get("cwd", REPO))
                try:
                    vimoe_dist.cli.main(case["argv"])
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = t0 + CASE_TIMEOUT_S
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                code = "timeout"
                break
            time.sleep(0.02)
        results.append({"index": i, "code": code, "seconds": time.monotonic() - t0})
    return results


if __name__ == "__main__":
    print(json.dumps(_drive(json.loads(Path(sys.argv[1]).read_text()))))
    sys.exit(0)


# ----------------------------------------------------------------------------------------------------- cases


def _busy_port() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files the cases point at: shards, broken YAML, a bad hostfile, checkpoints that do not fit."""
    import torch

    from vimoe_dist.config import load_config
    from vimoe_dist.data import write_digits
    from vimoe_dist.model import build_model

    d = tmp_path_factory.mktemp("bad-inputs")
    write_digits(d / "digits")
    (d / "not_yaml.yaml").write_text("train: [1, 2\nmodel: {")
    (d / "list.yaml").write_text("- train\n- model\n")
    (d / "typo.yaml").write_text("base: " + str(REPO / "configs" / "digits.yaml") + "\ntrian:\n  steps: 3\n")
    (d / "cycle.yaml").write_text("base: cycle.yaml\n")
    (d / "hostfile").write_text("node1 slots=2\nnode2 slots=two\n")
    (d / "hostfile_dup").write_text("node1 slots=2\nnode1 slots=2\n")
    # a checkpoint of another model (wider, in our DeepSpeed layout) and one whose save never completed
    other = load_config(
        REPO / "configs" / "digits.yaml",
        ["model.backbone_kwargs={patch_size: 4, embed_dim: 48, depth: 2, num_heads: 2}"],
    )
    tag = d / "other_model" / "checkpoints" / "step_00000010"
    tag.mkdir(parents=True)
    torch.save({"module": build_model(other.model).state_dict(), "step": 10}, tag / "mp_rank_00_model_states.pt")
    (tag / "COMPLETE").write_text("1\n")
    (d / "other_model" / "checkpoints" / "latest").write_text("step_00000010")
    (d / "half_saved" / "step_00000010").mkdir(parents=True)
    # a pickle that weights_only refuses: loading it would run code of a class we did not write
    torch.save({"state": {"w": torch.zeros(1)}, "args": __import__("argparse").Namespace(lr=1)}, d / "pickled.pt")
    return d


def _cases(d: Path, busy: int) -> list[tuple[str, list[str], dict, str]]:
    """(name, argv, environment, what the one error line must name)."""
    cfg = ["--config", str(REPO / "configs" / "digits.yaml")]
    data = [f"data.train={d}/digits/train-{{000000..000011}}.tar", f"data.val={d}/digits/val-000000.tar"]
    out = str(d / "runs" / "{name}")
    train = ["train", *cfg, *data, f"run.out_dir={out}", "parallel.ep_size=1"]
    single = {"unset": ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_ID"]}
    ev = ["eval", *cfg, *data]
    hostfile = ["launch", "hostfile", "--dry-run", "--hostfile"]
    local = ["launch", "local", "--dry-run", "--nproc"]
    return [
        # the config: keys, types, sizes
        ("unknown key", [*train, "train.stepz=3"], single, "train.stepz"),
        ("unknown section in the file", ["train", "--config", f"{d}/typo.yaml"], single, "trian"),
        ("int expected", [*train, "train.steps=ten"], single, "train.steps"),
        ("bool expected", [*train, "data.allow_pipe=maybe"], single, "data.allow_pipe"),
        ("list of 3 expected", [*train, "data.mean=[0.5, 0.5]"], single, "data.mean"),
        ("override without '='", [*train, "train.steps"], single, "train.steps"),
        ("a value is not a section", [*train, "train.steps.max=3"], single, "train.steps.max"),
        ("zero batch", [*train, "train.global_batch_size=0"], single, "train.global_batch_size"),
        ("negative lr", [*train, "train.lr=-0.1"], single, "train.lr"),
        ("top_k above num_experts", [*train, "model.moe.top_k=5"], single, "model.moe.top_k"),
        ("unknown router", [*train, "model.moe.router=top-any"], single, "model.moe.router"),
        ("bad layer spec", [*train, "model.moe.layers=first-2"], single, "model.moe.layers"),
        ("ep_size vs num_experts", [*train[:-1], "parallel.ep_size=3"], single, "parallel.ep_size"),
        ("ep_size vs world size", [*train[:-1], "parallel.ep_size=2"], single, "world size 1"),
        ("batch vs group size", [*train, "train.global_batch_size=12"], single, "model.moe.group_size"),
        ("fp16 on CPU", [*train, "parallel.precision=fp16"], single, "parallel.precision"),
        ("pushgateway URL", [*train, "metrics.pushgateway=ftp://gw:9091"], single, "metrics.pushgateway"),
        # files and URLs
        ("missing config file", ["train", "--config", f"{d}/nope.yaml"], single, f"{d}/nope.yaml"),
        ("config is not YAML", ["train", "--config", f"{d}/not_yaml.yaml"], single, "not_yaml.yaml"),
        ("config is not a mapping", ["train", "--config", f"{d}/list.yaml"], single, "list.yaml"),
        ("config includes itself", ["train", "--config", f"{d}/cycle.yaml"], single, "cycle.yaml"),
        ("missing shards", [*train, "data.train=/nonexistent/train-{000000..000003}.tar"], single, "data.train"),
        ("object-store URL", [*train, "data.train=s3://bucket/train-000000.tar"], single, "data.train"),
        ("pipe: not allowed", [*train, "data.val=pipe:cat /etc/hostname"], single, "data.val"),
        ("unreachable URL", [*train, "data.val=http://127.0.0.1:9/val-000000.tar"], single, "127.0.0.1:9/val-000000"),
        ("unwritable out_dir", [*train[:-2], "run.out_dir=/proc/vimoe", "parallel.ep_size=1"], single, "run.out_dir"),
        ("missing pretrained file", [*train, "model.pretrained=/nonexistent/vit.pt"], single, "model.pretrained"),
        ("pickle needs trust", [*train, f"model.pretrained={d}/pickled.pt"], single, "run.trust_checkpoint"),
        ("resume from nowhere", [*train, "run.resume=/nonexistent/ckpt"], single, "/nonexistent/ckpt"),
        ("metrics port in use", [*train, f"metrics.port={busy}", "metrics.port_search=false"], single, str(busy)),
        # the job's environment
        ("half-set launcher env", train, {"env": {"RANK": "0", "WORLD_SIZE": "2"}}, "LOCAL_RANK"),
        (
            "malformed Slurm hostlist",
            train,
            {
                **single,
                "env": {
                    "SLURM_JOB_ID": "7",
                    "SLURM_STEP_ID": "0",
                    "SLURM_PROCID": "0",
                    "SLURM_NTASKS": "2",
                    "SLURM_LOCALID": "0",
                    "SLURM_NODEID": "0",
                    "SLURM_STEP_NODELIST": "node[01-",
                    "SLURM_JOB_NODELIST": "node[01-",
                    "SLURM_STEP_TASKS_PER_NODE": "2",
                    "SLURM_TASKS_PER_NODE": "2",
                    "SLURM_STEP_NUM_NODES": "1",
                    "SLURM_NNODES": "1",
                },
            },
            "node[01-",
        ),
        # vimoe eval
        ("eval: no checkpoint", [*ev, "--checkpoint", "/nonexistent/run"], single, "/nonexistent/run"),
        ("eval: unfinished save", [*ev, "--checkpoint", f"{d}/half_saved"], single, "half_saved"),
        ("eval: another model", [*ev, "--checkpoint", f"{d}/other_model"], single, "does not fit"),
        # vimoe launch
        ("launch: bad hostfile line", [*hostfile, f"{d}/hostfile", *cfg], single, f"{d}/hostfile:2"),
        ("launch: host listed twice", [*hostfile, f"{d}/hostfile_dup", *cfg], single, "hostfile_dup:2"),
        ("launch: missing hostfile", [*hostfile, f"{d}/nohosts", *cfg], single, "nohosts"),
        ("launch: no ranks", [*local, "0", *cfg], single, "--nproc"),
        ("launch: restarts need torchrun", [*local, "2", "--max-restarts", "1", *cfg], single, "--max-restarts"),
        ("launch: config typo", ["launch", "slurm", "--nodes", "1", *cfg, "parallel.ep_sise=2"], single, "ep_sise"),
        # vimoe data
        ("data: unwritable out", ["data", "digits", "--out", "/proc/vimoe-digits"], single, "/proc/vimoe-digits"),
        ("data: missing folder", ["data", "from-folder", f"{d}/no_images", "--out", f"{d}/x"], single, "no_images"),
        ("data: pipe manifest", ["data", "manifest", "pipe:cat x.tar", "--out", f"{d}/m.json"], single, "pipe:"),
    ]


@pytest.mark.slow
def test_bad_inputs_fail_fast_with_one_line(inputs, tmp_path):
    busy = _busy_port()
    try:
        port = busy.getsockname()[1]
        table = _cases(inputs, port)
        assert len(table) >= 25
        cases = []
        for i, (_, argv, env, _) in enumerate(table):
            slug = f"case{i:02d}"
            argv = [a.replace("{name}", slug) for a in argv]
            cases.append({"argv": argv, "log": str(tmp_path / f"{slug}.log"), **env})
        spec = tmp_path / "cases.json"
        spec.write_text(json.dumps(cases))
        proc = subprocess.run(
            [sys.executable, __file__, str(spec)], capture_output=True, text=True, timeout=1500, cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1",
                 # DeepSpeed's CPU op from a cache of this interpreter's own (see tests/faults/conftest.py)
                 "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", f"{sys.prefix}/torch_extensions")},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        busy.close()

    slowest = sorted(zip((r["seconds"] for r in results), (t[0] for t in table)), reverse=True)[:5]
    print("slowest cases:", ", ".join(f"{name} {sec:.1f} s" for sec, name in slowest))
    failures = []
    for (name, _, _, needle), case, result in zip(table, cases, results):
        text = Path(case["log"]).read_text(errors="replace")
        errors = [line for line in text.splitlines() if "error:" in line]
        problems = []
        if result["code"] in (0, "timeout"):
            problems.append(f"exit {result['code']}")
        if "Traceback" in text:
            problems.append("traceback")
        if len(errors) != 1:
            problems.append(f"{len(errors)} error lines")
        elif needle not in errors[0]:
            problems.append(f"{needle!r} not named")
        # no engine was built (its DeepSpeed config is written just before) and no step was logged
        run_dir = inputs / "runs" / f"case{result['index']:02d}"
        metrics = run_dir / "metrics.jsonl"
        if (run_dir / "deepspeed_config.json").exists() or (metrics.exists() and metrics.stat().st_size):
            problems.append("work had started")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n    {text.strip()[-600:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--config", "configs/digits.yaml", "model.moe.num_experts=three"], "model.moe.num_experts"),
        (["launch", "hostfile", "--hostfile", "/nonexistent/hostfile", "--config", "configs/digits.yaml"], "hostfile"),
    ],
)
def test_the_real_entry_point_prints_one_line(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "vimoe_dist", *argv], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"vimoe {argv[0]}: error:") and needle in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and sum("error:" in line for line in lines) == 1, proc.stderr
