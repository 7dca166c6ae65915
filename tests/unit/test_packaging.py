"""What a wheel of the project promises: every imported package declared, one pinned set that is the tested set,
fairscale optional, a licence and a citation. (tests/unit/test_wheel.py installs a wheel and runs it.)"""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def declared(*groups: str) -> set[str]:
    """Canonical names of the distributions in the project's dependencies ("") and the named extras."""
    reqs = [r for g in groups for r in (PROJECT["dependencies"] if g == "" else PROJECT["optional-dependencies"][g])]
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def _owners(module: str, dists: list[str]) -> list[str]:
    """The distributions among `dists` whose files hold `module` (a.b.c: a/b/c.py or a/b/c/)."""
    parts = module.split(".")
    owners = []
    for dist in dists:
        files = {str(f) for f in distribution(dist).files or ()}
        for n in range(len(parts), 1, -1):
            stem = "/".join(parts[:n])
            if f"{stem}.py" in files or any(f.startswith(stem + "/") for f in files):
                owners.append(dist)
                break
    return owners


def imported_distributions(root: Path) -> dict[str, set[str]]:
    """Distribution -> files under `root` that import it (absolute imports of packages outside the stdlib)."""
    to_dist = packages_distributions()
    found: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in (
                    "__future__",
                    "vimoe_dist",
                    "support",
                    "conftest",
                    "launch_fakes",
                ):
                    continue
                dists = to_dist.get(top)
                assert dists, f"{path}: {top} belongs to no installed distribution"
                if len(dists) > 1:  # a namespace package (google.*): the distribution that holds this module
                    dists = _owners(module, dists) or dists
                for dist in dists:
                    found.setdefault(canonicalize_name(dist), set()).add(str(path.relative_to(REPO)))
    return found


def test_every_package_the_code_imports_is_a_dependency():
    core = declared("")
    optional = declared(*(extra for extra in PROJECT["optional-dependencies"] if extra != "dev"))
    for dist, files in imported_distributions(REPO / "vimoe_dist").items():
        assert dist in core or dist in optional, f"{dist} is imported by {sorted(files)} but not declared"
    assert {"numpy", "pillow", "braceexpand"} <= core


def test_every_package_the_tests_and_tools_import_is_declared():
    everything = declared("", *PROJECT["optional-dependencies"])
    for root in ("tests", "tools"):
        for dist, files in imported_distributions(REPO / root).items():
            assert dist in everything, f"{dist} is imported by {sorted(files)} but not declared"


def test_fairscale_is_an_extra():
    assert "fairscale" not in declared("") and "fairscale" in declared("fairscale")


def test_the_pinned_set_is_the_set_the_tests_run_with():
    """constraints.txt must be the dependency closure of pyproject.toml as installed here: `make test` installs with
    it, so in CI this fails when pyproject.toml gained a dependency that constraints.txt does not pin."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "constraints.py"), "--check", str(REPO / "constraints.txt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"run `make constraints`:\n{result.stdout}{result.stderr}"
    pins = (REPO / "constraints.txt").read_text()
    for name in ("torch", "torchvision", "deepspeed", "pip", *declared("", "fairscale", "dev", "tensorboard", "wandb")):
        assert f"\n{name}==" in pins, f"{name} is not pinned"


def test_makefile_installs_everything_with_the_constraints():
    installs = [line.strip() for line in (REPO / "Makefile").read_text().splitlines() if "pip install" in line]
    assert len(installs) == 3, installs  # pip itself, torch, the project with its extras
    assert all("-c $(CONSTRAINTS)" in line for line in installs), installs
    assert "'.[dev,fairscale,tensorboard,wandb]'" in installs[-1]
    assert "CONSTRAINTS := constraints.txt" in (REPO / "Makefile").read_text()


# fairscale missing is one line saying how to install it: tests/unit/test_reference_parity.py


def test_package_data_is_declared():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["vimoe_dist"]
    assert {"configs/*.yaml", "configs/*/*.yaml", "launch/templates/*", "launch/monitoring/*"} <= set(data)


def test_licence_and_citation():
    licence = (REPO / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence and PROJECT["license"] == "Apache-2.0"
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["title"].startswith("vimoe-dist")
    assert cff["version"] == PROJECT["version"]
    cited = {ref["identifiers"][0]["value"]: ref for ref in cff["references"]}
    assert set(cited) == {"arXiv:2410.15732", "arXiv:2401.15969"}
    assert cited["arXiv:2410.15732"]["authors"][0]["family-names"] == "Han"
    assert [a["family-names"] for a in cited["arXiv:2401.15969"]["authors"]] == [
        "Liu",
        "Blondel",
        "Riquelme",
        "Puigcerver",
    ]
