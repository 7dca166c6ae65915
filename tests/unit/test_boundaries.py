"""The model package is single-device PyTorch: it never imports torch.distributed, deepspeed, webdataset or
prometheus_client (parallelism is applied from outside, after construction)."""

import ast
from pathlib import Path

import pytest

MODEL = Path(__file__).parents[2] / "vimoe_dist" / "model"
FORBIDDEN = ("torch.distributed", "deepspeed", "webdataset", "prometheus_client", "fairscale", "vimoe_dist.parallel")


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", sorted(MODEL.rglob("*.py")), ids=lambda p: str(p.relative_to(MODEL)))
def test_model_imports_no_distributed_code(path):
    bad = [m for m in imported_modules(path) if m.startswith(FORBIDDEN)]
    assert bad == []


def test_the_check_sees_imports():
    assert "torch.distributed" in imported_modules(
        Path(__file__).parents[2] / "vimoe_dist" / "parallel" / "alltoall.py"
    )
