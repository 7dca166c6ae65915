"""Safety: YAML is read with safe_load only; files we did not write load as plain tensors (weights_only or
safetensors) unless the user says `run.trust_checkpoint=true`; checkpoints we load for eval or from another run are
checked the same way; and nothing a run writes (run directory, logs) carries secrets from the environment.

The metrics endpoint's own safety (binds `metrics.addr`, serves only /metrics, survives malformed requests) is tested
with the metrics sinks (tests/unit/test_metrics_server.py); `pipe:` sources with the data (tests/unit/test_data_*).
"""

from __future__ import annotations

import ast
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, SECRET
from support import raw_request

from vimoe_dist.config import ConfigError, load_config
from vimoe_dist.errors import UserError
from vimoe_dist.net import free_port

SOURCES = [p for d in ("vimoe_dist", "launcher", "bench") for p in (REPO / d).rglob("*.py")]


class _Exploit:
    """A pickle that, when loaded without weights_only, creates a marker file (stands in for any shell command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of `<something>.name(...)` in our sources."""
    out = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                out.append((path, node))
    return out


def test_yaml_is_only_ever_safe_loaded():
    unsafe = [
        f"{p.relative_to(REPO)}:{c.lineno}"
        for name in ("load", "load_all", "full_load", "unsafe_load", "unsafe_load_all")
        for p, c in _calls(name)
        if isinstance(c.func.value, ast.Name) and c.func.value.id == "yaml"
    ]
    assert not unsafe, unsafe
    assert _calls("safe_load")  # the scan does see the YAML reading


def test_yaml_tags_that_run_code_are_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = f"train:\n  steps: !!python/object/apply:os.system ['touch {marker}']\n"
    (tmp_path / "evil.yaml").write_text(evil)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "evil.yaml")
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(None, [f"train.steps=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    """Unrestricted unpickling appears only behind an explicit trust flag."""
    loose = []
    for path, call in _calls("load"):
        if not (isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"):
            continue
        kw = {k.arg: k.value for k in call.keywords}
        value = kw.get("weights_only")
        if isinstance(value, ast.Constant) and value.value is True:
            continue
        source = ast.unparse(value) if value is not None else "(default)"
        if "trust" in source:  # weights_only=not trust_checkpoint
            continue
        loose.append(f"{path.relative_to(REPO)}:{call.lineno} weights_only={source}")
    assert not loose, loose


def test_pretrained_pickle_needs_trust_and_never_runs_code(tmp_path):
    from vimoe_dist.model import build_model

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"blocks.0.attn.qkv.weight": _Exploit(marker)}, f, protocol=2)
    cfg = load_config(REPO / "configs" / "digits.yaml", [f"model.pretrained={evil}"])
    with pytest.raises(UserError, match=r"run\.trust_checkpoint"):
        build_model(cfg.model)
    assert not marker.exists()


def test_checkpoint_of_unknown_origin_is_checked_before_loading(tmp_path):
    """`vimoe eval/export --checkpoint DIR` reads files that may come from anywhere: weights_only as well."""
    from vimoe_dist.analysis.loading import load_model

    marker = tmp_path / "ran"
    tag = tmp_path / "ckpt" / "step_00000001"
    tag.mkdir(parents=True)
    with open(tag / "mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump({"module": {"x": _Exploit(marker)}}, f, protocol=2)
    (tag / "COMPLETE").write_text("1\n")
    cfg = load_config(REPO / "configs" / "digits.yaml")
    with pytest.raises(UserError, match="trust_checkpoint"):
        load_model(cfg, tmp_path / "ckpt")
    assert not marker.exists()
    # the same directory with real tensors loads fine (the check is not a blanket refusal)
    torch.save({"module": {"x": torch.zeros(1)}}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="does not fit"):
        load_model(cfg, tmp_path / "ckpt")


def test_runs_write_no_secret_from_the_environment(reference, jobs):
    """Every run of the suite had AWS_SECRET_ACCESS_KEY set; neither the run directory nor any log holds it."""
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") != SECRET  # only the runs had it
    files = [p for p in reference.rglob("*") if p.is_file()] + sorted(jobs.tmp.glob("*.log"))
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".log" for p in files)
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
    # and the resolved config holds only config keys
    resolved = yaml.safe_load((reference / "config.yaml").read_text())
    assert not re.search(r"AWS|SECRET|TOKEN|PASSWORD", yaml.safe_dump(resolved), re.IGNORECASE)


def test_hostile_requests_to_the_metrics_endpoint_do_not_disturb_training(jobs, tmp_path):
    """While a real run trains, its /metrics endpoint gets garbage, path traversal, a request smuggling attempt, an
    oversized header and half-sent requests: none of it reaches a file, the environment or the run, which trains on
    and checkpoints when it is stopped (it is given more steps than it can reach, so it cannot end mid-test)."""
    import signal
    import time

    port = free_port("127.0.0.1")
    out = tmp_path / "run"
    job = jobs.start(out, "parallel.ep_size=1", f"metrics.port={port}", "metrics.port_search=false",
                     "train.steps=100000", "train.checkpoint_every=100000", nproc=1)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:  # the endpoint is up before the model is built
            try:
                raw_request(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
                break
            except OSError:
                assert job.proc.poll() is None and time.monotonic() < deadline, job.log[-3000:]
                time.sleep(0.2)
        answers = [
            raw_request(port, b"\x00\xff\x16\x03\x01 not http at all\r\n\r\n"),
            raw_request(port, b"GET /../../../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n"),
            raw_request(port, b"GET /metrics/../config.yaml HTTP/1.0\r\n\r\n"),
            raw_request(port, b"GET /proc/self/environ HTTP/1.0\r\n\r\n"),
            raw_request(port, b"POST /metrics HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello"),
            raw_request(
                port, b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"
            ),
            raw_request(port, b"GET /metrics HTTP/1.0\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"),
        ]
        for _ in range(20):  # half-sent requests, closed at once
            raw_request(port, b"GET /metr", read=False)
        reached = max(job.steps(), default=0)
        job.wait_for_step(reached + 5)  # training went on through all of it
        scrape = raw_request(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        os.kill(job.proc.pid, signal.SIGTERM)
    except BaseException:
        job.kill()
        raise
    code = job.finish()
    assert code == 75, job.log[-3000:]  # checkpointed and asks for a requeue, as after any preemption
    assert any(p.name.startswith("step") for p in (out / "checkpoints").iterdir()), job.log[-3000:]
    assert scrape.startswith(b"HTTP/1.0 200") and b"vimoe_train_steps_total" in scrape
    for answer in [*answers, scrape]:
        assert SECRET.encode() not in answer and b"AWS_" not in answer and str(REPO).encode() not in answer
        assert b"root:" not in answer and b"run:" not in answer  # no /etc/passwd, no config.yaml
    assert all(not a.startswith(b"HTTP/1.0 200") for a in answers[1:4]), answers[1:4]
