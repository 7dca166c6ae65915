import pytest

from vimoe_dist.config import ConfigError, load_config, parse_layers


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg.model.moe.router == "tc-softmax"


def test_overrides_parse_yaml_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  moe:\n    num_experts: 4\n")
    cfg = load_config(path, ["model.moe.top_k=1", "model.moe.capacity_factor=null", "model.moe.layers=[1, 3]"])
    assert cfg.model.moe.num_experts == 4 and cfg.model.moe.top_k == 1
    assert cfg.model.moe.capacity_factor is None and cfg.model.moe.layers == [1, 3]


def test_base_overlay(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  steps: 7\n  lr: 0.5\n")
    (tmp_path / "exp.yaml").write_text("base: base.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "exp.yaml")
    assert cfg.train.steps == 9 and cfg.train.lr == 0.5


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.moe.rooter=soft"], "model.moe.rooter"),
        (["model.moe.router=nope"], "model.moe.router"),
        (["model.moe.top_k=9"], "model.moe.top_k"),
        (["model.moe.capacity_factor=0"], "model.moe.capacity_factor"),
        (["model.moe.capacity_factor=-1"], "model.moe.capacity_factor"),
        (["model.moe.group_size=0"], "model.moe.group_size"),
        (["model.moe.layers=first-2"], "model.moe.layers"),
        (["train.steps=ten"], "train.steps"),
        (["train.steps"], "key=value"),
        (["parallel.ep_size=3"], "parallel.ep_size"),
        (["parallel.precision=fp8"], "parallel.precision"),
        (["model.moe.routing=pixel"], "model.moe.routing"),
        (["model.moe.load_loss=0.1"], "model.moe.load_loss"),
        (["model=3"], "model"),
    ],
)
def test_bad_config_names_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_layers_against_depth():
    assert parse_layers("last-2", depth=6) == [4, 5]
    assert parse_layers("last-0", depth=6) == []
    assert parse_layers([0, -1], depth=6) == [0, 5]
    with pytest.raises(ConfigError, match="depth 6"):
        parse_layers("last-7", depth=6)
    with pytest.raises(ConfigError, match="block 6"):
        parse_layers([6], depth=6)


def test_router_names_match_the_registry():
    from vimoe_dist.config import ROUTER_NAMES
    from vimoe_dist.model.moe.routers import ROUTERS

    assert tuple(sorted(ROUTERS)) == ROUTER_NAMES


def test_loading_a_config_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from vimoe_dist.config import load_config; load_config('configs/digits.yaml'); " \
           "print('torch' in sys.modules)"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_deepspeed_launchers_local_rank_is_accepted_anywhere(monkeypatch):
    from vimoe_dist.cli import strip_local_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank(["--local_rank=1", "train", "--config", "c.yaml", "a=1"]) == [
        "train",
        "--config",
        "c.yaml",
        "a=1",
    ]
    import os

    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_local_rank(["train", "--local-rank", "3", "--config", "c.yaml"]) == ["train", "--config", "c.yaml"]


def test_impl_left_the_training_config(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.moe.impl=deepspeed"])
    assert str(e.value).startswith("model.moe.impl: 'deepspeed'") and "\n" not in str(e.value)
    # the config.yaml of an older run names our layer: it still loads
    old = tmp_path / "config.yaml"
    old.write_text("model:\n  moe:\n    impl: vimoe\n    num_experts: 4\n")
    assert load_config(old).model.moe.num_experts == 4
