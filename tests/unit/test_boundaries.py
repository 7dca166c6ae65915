"""Package boundaries. The model package is single-device PyTorch: it never imports torch.distributed, deepspeed,
webdataset, prometheus_client, fairscale or our parallel package (parallelism is applied from outside, after
construction), not directly, not through another module of ours, and not by a string handed to importlib. And
`vimoe_dist/parallel/` is the one home of torch.distributed, DeepSpeed and fairscale: no other module imports them."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "vimoe_dist"
MODEL = PACKAGE / "model"
FORBIDDEN = ("torch.distributed", "deepspeed", "webdataset", "prometheus_client", "fairscale", "vimoe_dist.parallel")


DISTRIBUTED = ("torch.distributed", "deepspeed", "fairscale")


def imported_modules(source: str, strings: bool = True) -> list[str]:
    """Every module `source` imports: import statements anywhere (function-level ones included), and string
    constants that name a module (a dotted path, optionally with `:attr`, as importlib and lazy export tables spell
    them; prose has spaces and is not taken for one)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif strings and isinstance(node, ast.Constant) and _looks_like_module(node.value):
            names.append(node.value.split(":")[0])
    return names


def _looks_like_module(text: object) -> bool:
    if not isinstance(text, str):
        return False
    path = text.split(":")[0]
    return "." in path and " " not in text and all(part.isidentifier() for part in path.split("."))


def reachable(path: Path, root: Path = PACKAGE) -> set[str]:
    """Modules imported by `path`, following our own modules (those under `root`) to what they import in turn."""
    seen, todo = set(), [path]
    visited: set[Path] = set()
    while todo:
        current = todo.pop()
        if current in visited:
            continue
        visited.add(current)
        for name in imported_modules(current.read_text()):
            seen.add(name)
            if name.split(".")[0] == root.name:
                file = _module_file(name, root)
                if file is not None:
                    todo.append(file)
    return seen


def _module_file(name: str, root: Path) -> Path | None:
    parts = name.split(".")[1:]
    for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if parts and candidate.is_file():
            return candidate
    return None


@pytest.mark.parametrize("path", sorted(MODEL.rglob("*.py")), ids=lambda p: str(p.relative_to(MODEL)))
def test_model_imports_no_distributed_code(path):
    bad = sorted(m for m in reachable(path) if m.startswith(FORBIDDEN))
    assert bad == []


OUTSIDE_PARALLEL = sorted(p for p in PACKAGE.rglob("*.py") if "parallel" not in p.relative_to(PACKAGE).parts)


@pytest.mark.parametrize("path", OUTSIDE_PARALLEL, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_parallel_package_imports_distributed_code(path):
    # import statements only: `python -m torch.distributed.run` in a launcher's command line is no import
    assert [m for m in imported_modules(path.read_text(), strings=False) if m.startswith(DISTRIBUTED)] == []


def test_the_check_sees_imports():
    assert "torch.distributed" in imported_modules((PACKAGE / "parallel" / "alltoall.py").read_text())


def test_the_check_sees_imports_by_string_and_through_our_modules(tmp_path):
    pkg = tmp_path / "vimoe_dist"
    (pkg / "model").mkdir(parents=True)
    (pkg / "other.py").write_text("import deepspeed\n")
    (pkg / "model" / "build.py").write_text(
        "import importlib\n"
        "LAYERS = {'deepspeed': 'vimoe_dist.other:Layer'}\n"
        "HELP = 'prose with spaces is no module name: deepspeed.moe is'\n"
    )
    assert "deepspeed" in reachable(pkg / "model" / "build.py", root=pkg)
    assert not any(m.startswith("prose") for m in imported_modules((pkg / "model" / "build.py").read_text()))
