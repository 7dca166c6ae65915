import pytest
from support import unset_env

from vimoe_dist.config import ConfigError, load_config, parse_layers, parse_override


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

    unset_env(monkeypatch, "LOCAL_RANK")
    assert strip_local_rank(["--local_rank=1", "train", "--config", "c.yaml", "a=1"]) == [
        "train",
        "--config",
        "c.yaml",
        "a=1",
    ]
    import os

    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_local_rank(["train", "--local-rank", "3", "--config", "c.yaml"]) == ["train", "--config", "c.yaml"]


# ------------------------------------------------------------------ hostile input (issue 13): caps, bounds, base


def _bomb(levels: int) -> str:
    """A flow list whose alias expansion holds 9**levels strings (the "billion laughs" in a few hundred bytes)."""
    items = ["&l0 [x, x, x, x, x, x, x, x, x]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"[{', '.join(items)}]"


def _load_in_child(path, overrides=(), timeout=60):
    """load_config in a child interpreter (memory capped), so that a hang fails the test instead of hanging it:
    returns (outcome, message, seconds) with outcome 'ok', 'refused' (ConfigError) or the exception's type."""
    import json
    import subprocess
    import sys

    code = (
        "import json, resource, sys, time\n"
        "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
        "from vimoe_dist.config import ConfigError, load_config\n"
        "path, overrides = json.loads(sys.argv[1])\n"
        "t0 = time.perf_counter()\n"
        "try:\n"
        "    load_config(path, overrides); out = ['ok', '']\n"
        "except ConfigError as e:\n"
        "    out = ['refused', str(e)]\n"
        "except BaseException as e:\n"
        "    out = [type(e).__name__, str(e)[:500]]\n"
        "print(json.dumps([*out, time.perf_counter() - t0]))\n"
    )
    arg = json.dumps([None if path is None else str(path), list(overrides)])
    try:
        proc = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hang", "", float(timeout)
    assert proc.stdout, proc.stderr[-2000:]
    return tuple(json.loads(proc.stdout))


def test_alias_bomb_in_a_file_is_refused_at_once(tmp_path):
    """9**9 strings once expanded, in a file of a few hundred bytes; today's message would print them all."""
    path = tmp_path / "bomb.yaml"
    path.write_text(f"train:\n  steps: {_bomb(9)}\n")
    assert path.stat().st_size < 700
    outcome, message, seconds = _load_in_child(path)
    assert outcome == "refused" and "aliases are expanded" in message and "\n" not in message, (outcome, message)
    assert seconds < 2


def test_alias_bomb_in_an_override_is_refused_at_once():
    override = f"train.steps={_bomb(9)}"
    assert len(override) < 460
    outcome, message, seconds = _load_in_child(None, [override])
    assert outcome == "refused" and "override train.steps" in message and "aliases are expanded" in message
    assert seconds < 2


def test_a_recursive_alias_is_refused():
    with pytest.raises(ConfigError, match="refers to a node that contains it"):
        load_config(None, ["data.train=&r [*r]"])


@pytest.mark.parametrize(
    "value",
    [
        "{k: " * 3000 + "1" + "}" * 3000,  # 3,000 keys deep
        "[" * 5000 + "]" * 5000,  # 5,000 lists deep
        "{k: " * 100 + "1" + "}" * 100,  # deeper than the cap, not than libyaml's limit
    ],
    ids=["3000 keys", "5000 lists", "100 keys"],
)
def test_deep_nesting_is_one_line(tmp_path, value):
    path = tmp_path / "deep.yaml"
    path.write_text(f"model:\n  backbone_kwargs:\n    a: {value}\n")
    for source, overrides in ((path, ()), (None, [f"model.backbone_kwargs={{a: {value}}}"])):
        with pytest.raises(ConfigError, match=r"nested deeper than 32 levels|exceeded maximum nesting depth") as e:
            load_config(source, overrides)
        assert "\n" not in str(e.value)


def test_block_style_nesting_is_capped(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("model:\n backbone_kwargs:\n" + "".join("  " + " " * i + "k:\n" for i in range(300)))
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        load_config(path)


def test_size_caps(tmp_path):
    from vimoe_dist.config import MAX_YAML_BYTES, MAX_YAML_NODES

    path = tmp_path / "big.yaml"
    path.write_text("train:\n  steps: 10\n" + "#" * MAX_YAML_BYTES + "\n")
    with pytest.raises(ConfigError, match="larger than 256 KiB"):
        load_config(path)
    with pytest.raises(ConfigError, match="longer than 256 KiB"):
        load_config(None, ["run.out_dir=" + "x" * MAX_YAML_BYTES])
    # a list just under the node cap loads fast; one over it is refused
    import time

    under = "[" + ", ".join(["1"] * (MAX_YAML_NODES - 10)) + "]"
    t0 = time.perf_counter()
    assert load_config(None, [f"data.train={under}"]).data.train == [1] * (MAX_YAML_NODES - 10)
    assert time.perf_counter() - t0 < 2
    with pytest.raises(ConfigError, match=f"more than {MAX_YAML_NODES} values"):
        load_config(None, ["data.train=[" + ", ".join(["1"] * MAX_YAML_NODES) + "]"])


def test_anchors_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: &t\n  steps: 7\n  lr: 1e-3\nrun:\n  out_dir: &d runs/x\n  resume: never\n")
    assert load_config(path).train.lr == 0.001
    path.write_text("x: &m {num_experts: 4, top_k: 1}\n")  # an unknown top-level key, as a control
    with pytest.raises(ConfigError, match="unknown config key 'x'"):
        load_config(path)
    path.write_text("model:\n  moe:\n    <<: {num_experts: 4, top_k: 1}\n    top_k: 2\n")
    cfg = load_config(path)
    assert (cfg.model.moe.num_experts, cfg.model.moe.top_k) == (4, 2)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("base: 5\n", "base: 5 is not a file name"),
        ("base:\n", "base: None is not a file name"),
        ("base: [a.yaml]\n", "is not a file name"),
        ("base: ''\n", "is not a file name"),
        ('base: "a\\0b.yaml"\n', "is not a file name"),
        ('base: "a\\nb.yaml"\n', "is not a file name"),
        ("base: {a: 1}\n", "is not a file name"),
    ],
)
def test_base_must_be_a_file_name(tmp_path, text, needle):
    path = tmp_path / "exp.yaml"
    path.write_text(text + "train:\n  steps: 9\n")
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_base_is_relative_to_the_including_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("train:\n  steps: 7\n")
    (tmp_path / "sub" / "exp.yaml").write_text("base: ../base.yaml\ntrain:\n  lr: 2e-4\n")
    monkeypatch.chdir(tmp_path / "sub")  # not where the base is looked for
    cfg = load_config(tmp_path / "sub" / "exp.yaml")
    assert (cfg.train.steps, cfg.train.lr) == (7, 2e-4)
    (tmp_path / "sub" / "dir.yaml").write_text("base: ..\n")
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config(tmp_path / "sub" / "dir.yaml")


def test_a_long_chain_of_bases_is_refused(tmp_path):
    for i in range(40):
        (tmp_path / f"c{i}.yaml").write_text(f"base: c{i + 1}.yaml\n" if i < 39 else "train:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="more than 16 files chained"):
        load_config(tmp_path / "c0.yaml")
    assert load_config(tmp_path / "c30.yaml").train.steps == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1e-3", 0.001), ("5E4", 50000.0), ("-2e-4", -2e-4), (".5e1", 5.0), ("1_0e1", 100.0), ("1e+2", 100.0)],
)
def test_exponent_floats_are_numbers(tmp_path, text, expected):
    """YAML 1.1 (PyYAML) reads `1e-3` as a string; YAML 1.2 and every user read it as a number."""
    assert parse_override(f"model.moe.noise_std={text}")[1] == expected
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {text.lstrip('-')}\n  steps: 1e5\n")
    cfg = load_config(path)
    assert cfg.train.lr == abs(expected) and cfg.train.steps == 100_000
    assert load_config(None, [f"train.lr={text.lstrip('-')}"]).train.lr == abs(expected)
    assert parse_override("run.out_dir='1e-3'")[1] == "1e-3"  # quoted: still a string


@pytest.mark.parametrize(
    "override",
    [
        "train.global_batch_size=18446744073709551616",  # 2**64: hung the trainer
        "data.std=[.nan, 0.224, 0.225]",  # skipped every step, blamed the router, saved an untrained checkpoint
        "model.moe.hidden_ratio=0",
        "model.moe.min_capacity=-5",
        "train.min_lr=.nan",
        "train.betas=[2, -1]",
        "model.in_chans=0",
        "run.seed=1180591620717411303424",  # 2**70
        "run.seed=-1",
        "train.lr=1" + "0" * 400,  # an integer beyond the float range: OverflowError
        "train.steps=" + "9" * 5000,  # beyond Python's digit limit: ValueError
        "train.steps=1000000001",
        "parallel.timeout_s=1.0e+300",  # datetime.timedelta overflows in the process group's setup
        "metrics.push_timeout_s=1.0e+300",
        "data.mean=[123.7, 116.3, 103.5]",  # 0-255 values
        "data.std=[58.4, 57.1, 57.4]",
        "data.num_workers=100000",
        "data.shuffle_buffer=18446744073709551616",
        "model.moe.sinkhorn_iters=1000000000",
        "model.moe.sparse_gamma=0",
        "model.num_classes=18446744073709551616",
        "model.img_size=1000000",
        "model.backbone_kwargs={depth: 1e9}",
        "model.backbone_kwargs={embed_dim: .nan}",
        "model.dense_ffn_hidden={0: 18446744073709551616}",
    ],
)
def test_out_of_range_values_are_refused(override):
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert key in message and "\n" not in message and len(message) < 300, message


def test_the_bounds_allow_their_edges():
    cfg = load_config(
        None,
        [
            "run.seed=9223372036854775807",
            "train.betas=[0, 0.999999]",
            "train.min_lr=0",
            "model.moe.min_capacity=1",
            "model.moe.hidden_ratio=1e-3",
            "data.std=[1, 1, 1]",
            "data.mean=[0, 0, 0]",
            "train.global_batch_size=1048576",
            "train.steps=1000000000",
        ],
    )
    assert cfg.run.seed == 2**63 - 1 and cfg.train.betas == (0.0, 0.999999)


def test_the_largest_seed_seeds_every_step():
    from vimoe_dist.train.setup import seed_everything
    from vimoe_dist.train.step import seed_step

    seed_everything(2**63 - 1)
    seed_step(2**63 - 1, 10**9, 4095)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ('run.out_dir="a\\nb"', "control characters"),
        ('run.out_dir="a\\0b"', "control characters"),
        ('metrics.job="a\\rb"', "control characters"),
        ("model.pretrained=" + "x" * 5000, "longer than 4096 characters"),
        ("model.backbone_kwargs={1: 2}", "is not an argument name"),
        ("model.moe.layers=last-²", "model.moe.layers"),
    ],
)
def test_strings_without_control_characters_or_excess(override, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(None, [override])
    assert len(str(e.value)) < 300


def test_odd_keys_and_big_values_give_short_messages(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 4\n  1: 2\n  null: 3\n  2.5: 5\n")  # keys that do not sort with strings
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.1'"):
        load_config(path)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.steps=[" + ", ".join(["123456789"] * 5000) + "]"])
    assert str(e.value).startswith("train.steps: expected an integer") and len(str(e.value)) < 300


def test_the_caps_hold_without_libyaml():
    """PyYAML built without libyaml falls back to its pure-Python parser, whose composer recurses per level."""
    import subprocess
    import sys

    code = f"""
import yaml
del yaml.CSafeLoader  # as in a PyYAML built without libyaml
from vimoe_dist.config import ConfigError, _ConfigLoader, load_config
assert _ConfigLoader.__mro__[1] is yaml.SafeLoader
assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001
for override, needle in [
    ({f"train.steps={_bomb(9)}"!r}, "aliases are expanded"),
    ("data.train=" + "[" * 5000 + "]" * 5000, "nested deeper than 32"),
    ("data.train=" + "{{a: " * 3000 + "1" + "}}" * 3000, "nested deeper than 32"),
    ("data.train=&r [*r]", "contains it"),
]:
    try:
        load_config(None, [override])
    except ConfigError as e:
        assert needle in str(e), str(e)
    else:
        raise AssertionError(override)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_impl_left_the_training_config(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.moe.impl=deepspeed"])
    assert str(e.value).startswith("model.moe.impl: 'deepspeed'") and "\n" not in str(e.value)
    # the config.yaml of an older run names our layer: it still loads
    old = tmp_path / "config.yaml"
    old.write_text("model:\n  moe:\n    impl: vimoe\n    num_experts: 4\n")
    assert load_config(old).model.moe.num_experts == 4
