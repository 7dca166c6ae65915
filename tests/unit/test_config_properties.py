"""Property-based tests (hypothesis) of config parsing and dot-list overrides, and of Slurm hostlist expansion.

Config: a resolved config survives `config.yaml` and back unchanged; an override means the same as the nested YAML
mapping; the last override of a key wins and distinct keys commute; any value for any key either loads or raises a
one-line `ConfigError` naming that key (never another exception); unknown keys are named; a float written the way
Python prints it (`1e-05`) is a number; every numeric key has a row in `BOUNDS`.

Hostile values (NaN, infinities, negative, zero, huge, wrong types, deep nesting, alias bombs, long strings, control
characters) for every key of the schema, enumerated from the dataclasses so that a new key is covered without a
change here: `load_config` and `vimoe launch local --dry-run` accept them or refuse them in one line (`ConfigError`;
exit 2), within 2 s, never a traceback. They run in a child interpreter (`_Worker`) so that a hang is reported as a
failure, and the child killed, instead of hanging the test run.

Hostlists: expansion matches an independent expansion of generated structures (prefixes, zero-padded ranges,
several bracket groups, comma lists), a comma list expands to the concatenation of its items, the first host is
the first of the expansion, and arbitrary text either expands to host names or raises `UserError`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import select
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vimoe_dist.config import (
    BOUNDS,
    ROUTER_NAMES,
    Config,
    ConfigError,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from vimoe_dist.errors import UserError
from vimoe_dist.launch.hostlist import expand_hostlist, expand_tasks_per_node, first_host

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ------------------------------------------------------------------------------------------------------ config

# keys with strategies of values that must load (kept independent of each other: no cross-key constraints)
VALID = {
    "run.seed": st.integers(0, 2**31),
    "run.out_dir": st.from_regex(r"[a-z][a-z0-9_/]{0,20}", fullmatch=True),
    "train.steps": st.integers(1, 10**6),
    "train.lr": st.floats(1e-8, 10.0),
    "train.warmup_steps": st.integers(0, 1000),
    "train.weight_decay": st.floats(0, 1),
    "train.label_smoothing": st.floats(0, 0.99),
    "train.layer_decay": st.floats(0.01, 1.0),
    "train.log_every": st.integers(1, 100),
    "train.checkpoint_every": st.integers(0, 100),
    "train.keep_checkpoints": st.integers(1, 10),
    "train.max_bad_steps": st.integers(0, 100),
    "train.progress": st.booleans(),
    "train.betas": st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)).map(list),
    "parallel.zero_stage": st.sampled_from([0, 1, 2]),
    "parallel.precision": st.sampled_from(["fp32", "bf16", "fp16"]),
    "parallel.timeout_s": st.floats(0.1, 1e5),
    "model.img_size": st.integers(1, 1024),
    "model.num_classes": st.integers(1, 10**5),
    "model.drop_path": st.floats(0, 0.99),
    "model.moe.router": st.sampled_from(ROUTER_NAMES),
    "model.moe.group_size": st.integers(1, 64),
    "model.moe.routing": st.sampled_from(["image", "token"]),
    "model.moe.layers": st.one_of(
        st.integers(0, 12).map(lambda n: f"last-{n}"), st.lists(st.integers(0, 23), unique=True, max_size=6)
    ),
    "model.moe.switch_loss": st.floats(0, 1),
    "data.num_workers": st.integers(0, 16),
    "data.order": st.sampled_from(["stream", "exact"]),
    "data.hflip": st.floats(0, 1),
    "data.mean": st.tuples(*[st.floats(0, 1)] * 3).map(list),
    "data.train": st.from_regex(r"/data/[a-z]{1,8}-\{000000\.\.0000[1-9]\}\.tar", fullmatch=True),
    "metrics.port": st.integers(0, 65535),
    "metrics.job": st.from_regex(r"[a-z][a-z0-9_-]{0,15}", fullmatch=True),
}


def _leaf_keys(cls: type = Config, prefix: str = "") -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_keys(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = tp
    return out


LEAVES = _leaf_keys()
valid_overrides = st.dictionaries(st.sampled_from(sorted(VALID)), st.none(), max_size=8).flatmap(
    lambda keys: st.fixed_dictionaries({k: VALID[k] for k in keys})
)


def _override(key: str, value) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def _nested(items: dict) -> dict:
    raw: dict = {}
    for key, value in items.items():
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


def test_every_valid_key_is_a_schema_leaf():
    assert set(VALID) <= set(LEAVES)


@SETTINGS
@given(items=valid_overrides)
def test_resolved_config_survives_config_yaml(tmp_path, items):
    cfg = load_config(None, [_override(k, v) for k, v in items.items()])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)


@SETTINGS
@given(items=valid_overrides)
def test_an_override_means_the_same_as_the_yaml_mapping(tmp_path, items):
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(_nested(items)))
    assert load_config(None, [_override(k, v) for k, v in items.items()]) == load_config(path)


@SETTINGS
@given(items=valid_overrides, data=st.data())
def test_last_override_wins_and_distinct_keys_commute(items, data):
    overrides = [_override(k, v) for k, v in items.items()]
    shuffled = data.draw(st.permutations(overrides))
    assert load_config(None, shuffled) == load_config(None, overrides)
    if items:
        key = data.draw(st.sampled_from(sorted(items)))
        earlier = data.draw(VALID[key])
        assert load_config(None, [_override(key, earlier), *overrides]) == load_config(None, overrides)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 50), st.floats(-2, 2), st.text(max_size=3)), max_size=4),
    st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), max_size=2),
)


@SETTINGS
@given(key=st.sampled_from(sorted(LEAVES)), value=scalars)
def test_any_value_loads_or_is_a_one_line_error_naming_the_key(tmp_path, key, value):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_nested({key: value})))
    try:
        load_config(path)
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message
        # the key itself, or (for a list element) the key with its index
        assert key in message or key.rsplit(".", 1)[0] in message, (key, value, message)


@SETTINGS
@given(
    section=st.sampled_from(["run", "train", "parallel", "model", "model.moe", "data", "metrics"]),
    name=st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True),
)
def test_unknown_keys_are_named(section, name):
    key = f"{section}.{name}"
    if key in LEAVES or any(k.startswith(key + ".") for k in LEAVES):
        return
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [f"{key}=1"])


@SETTINGS
@given(
    key=st.sampled_from(sorted(LEAVES)),
    value=st.one_of(
        st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.text(alphabet="abc xyz_-.", max_size=8)
    ),
)
def test_parse_override_reads_back_the_yaml_scalar(key, value):
    parsed_key, parsed = parse_override(_override(key, value))
    assert parsed_key == key
    if isinstance(value, str) and not value.strip():
        assert parsed in (value, None)  # an empty or blank value means null
    elif isinstance(value, float) and math.isinf(value):
        assert parsed == value
    else:
        assert parsed == value and type(parsed) is type(value)


def _is_numeric(tp) -> bool:
    if tp in (int, float):
        return True
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return (
        typing.get_origin(tp) in (tuple, typing.Union, types.UnionType) and bool(args) and all(map(_is_numeric, args))
    )


def test_every_numeric_key_has_a_bound():
    numeric = {key for key, tp in LEAVES.items() if _is_numeric(tp)}
    assert numeric - set(BOUNDS) == set()
    # rows name schema keys, or arguments inside model.backbone_kwargs
    assert {k for k in BOUNDS if not k.startswith("model.backbone_kwargs.")} <= numeric


@SETTINGS
@given(x=st.floats(allow_nan=False, allow_infinity=False, min_value=0, exclude_min=True))
def test_a_float_as_python_prints_it_is_a_number(x):
    """`repr` writes 1e-05 and 5e+20 without a dot, which YAML 1.1 (PyYAML) would read as strings."""
    assert parse_override(f"train.lr={x!r}") == ("train.lr", x)
    assert parse_override(f"train.lr={x:e}")[1] == float(f"{x:e}")
    assert parse_override(f"train.lr={x!r}".replace("e", "E"))[1] == x


# ------------------------------------------------------------------------------------------- hostile values

REPO = Path(__file__).resolve().parents[2]
SECONDS = 2.0  # the most one hostile config may take to load or be refused
HANG_S = 15.0  # no answer from the worker in this long: a hang (generous: the machine may be loaded)
START_S = 300.0  # the worker's imports (torch among them), before it answers anything
CLI = ["launch", "local", "--dry-run", "--nproc", "1", "--launcher", "torchrun"]


def _bomb(levels: int) -> str:
    """A flow list whose alias expansion holds 9**levels strings (the "billion laughs" in a few hundred bytes)."""
    items = ["&l0 [x, x, x, x, x, x, x, x, x]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"[{', '.join(items)}]"


# YAML text of each hostile value, written in place of a key's value
HOSTILE = {
    "nan": ".nan",
    "inf": ".inf",
    "-inf": "-.inf",
    "negative": "-1",
    "tiny negative": "-1.0e-300",
    "zero": "0",
    "float zero": "0.0",
    "2**64": str(2**64),
    "-2**70": str(-(2**70)),
    "10**400": "1" + "0" * 400,
    "5000 digits": "9" * 5000,
    "1e308": "1e308",
    "1e999": "1e999",
    "exponent string": "'1e-3'",
    "string": "abc",
    "bool": "true",
    "null": "null",
    "list": "[1, 2]",
    "list of nan": "[.nan, .nan, .nan]",
    "mapping": "{a: 1}",
    "number-keyed mapping": "{1: 2, a: 3}",
    "deep lists": "[" * 40 + "]" * 40,
    "deeper lists": "[" * 5000 + "]" * 5000,
    "deep mappings": "{a: " * 3000 + "1" + "}" * 3000,
    "alias bomb": _bomb(9),
    "recursive alias": "&r [*r]",
    "long string": "x" * 100_000,
    "newline": '"a\\nb"',
    "NUL": '"a\\0b"',
    "undecodable byte": "a\udcffb",  # from the command line (surrogateescape) or a file that is not UTF-8
    "wide list": "[" + ", ".join(["1"] * 2_000) + "]",
}


def _config_text(key: str, value_yaml: str) -> str:
    *sections, leaf = key.split(".")
    lines = [f"{'  ' * i}{part}:" for i, part in enumerate(sections)]
    return "\n".join([*lines, f"{'  ' * len(sections)}{leaf}: {value_yaml}"]) + "\n"


class _Worker:
    """A child interpreter that loads configs on request; the parent waits at most HANG_S for each answer."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proc = None

    def _start(self) -> None:
        path = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]  # tests/: support.py
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(self.tmp)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env,
        )  # fmt: skip
        ready, _, _ = select.select([self.proc.stdout], [], [], START_S)  # torch's import: not a config's time
        assert ready and json.loads(self.proc.stdout.readline()) == {"ready": True}, "the worker did not start"

    def ask(self, request: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], HANG_S)
        if not ready:
            self.close()
            return {"outcome": "hang"}
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            return {"outcome": "died"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _serve(tmp: str) -> None:
    """The worker's side: one JSON request per line (YAML text, overrides, CLI or not), one JSON answer per line."""
    import contextlib
    import io
    import resource
    import time
    import traceback

    from support import tiny_dataset

    import vimoe_dist.parallel.device  # noqa: F401 (torch, for the launcher's device check: imported once)
    from vimoe_dist.cli import build_parser, main

    build_parser()  # imports every command's module once: the 2 s are for the config, not for imports
    # the launcher checks the data before it starts a rank: a data set to check (overridden by a hostile data.train
    # or data.val given as an override; one in the file is replaced by this)
    data = tiny_dataset(Path(tmp) / "data")
    data_overrides = [f"data.train={data}", f"data.val={data}"]
    sys.stdout.write(json.dumps({"ready": True}) + "\n")  # the imports are done: answers are timed from here
    sys.stdout.flush()
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # an alias bomb of old fails, not the machine
    path = Path(tmp) / "hostile.yaml"
    for line in sys.stdin:
        request = json.loads(line)
        path.write_text(request["yaml"], errors="surrogateescape")
        err = io.StringIO()
        t0 = time.perf_counter()
        try:
            if request["cli"]:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                    main([*CLI, "--config", str(path), *data_overrides, *request["overrides"]])
                answer = {"outcome": "ok"}  # pragma: no cover - main always exits
            else:
                load_config(path, request["overrides"])
                answer = {"outcome": "ok"}
        except ConfigError as e:
            answer = {"outcome": "refused", "message": str(e)}
        except SystemExit as e:
            answer = {"outcome": "exit", "code": e.code, "message": err.getvalue()}
        except BaseException as e:  # what a user would see as a traceback
            answer = {"outcome": "traceback", "message": "".join(traceback.format_exception_only(e))[-2000:]}
        answer["seconds"] = time.perf_counter() - t0
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = _Worker(tmp_path_factory.mktemp("worker"))
    yield w
    w.close()


def _check_answer(answer: dict, key: str, what: str, cli: bool) -> None:
    """Loaded (exit 0), or refused in one short line that names the key's section, the override or the file."""
    assert answer["outcome"] not in ("hang", "died", "traceback"), (what, answer)
    assert answer["seconds"] < SECONDS, (what, answer)
    if cli:
        assert answer["outcome"] == "exit" and answer["code"] in (0, 2), (what, answer)
        if answer["code"] == 0:
            return
        assert answer["message"].startswith("vimoe launch: error: ") and answer["message"].count("\n") == 1
    elif answer["outcome"] == "ok":
        return
    message = answer["message"].strip()
    assert "\n" not in message and len(message) < 1000, (what, answer)
    assert any(n in message for n in (key.rsplit(".", 1)[0], "override", "config file")), (what, answer)


@pytest.mark.slow
def test_hostile_values_for_every_key_load_or_are_one_line(worker):
    """Every schema key x every hostile value, through load_config from a file and as an override; the failures
    are reported together."""
    failures = []
    for name, value in HOSTILE.items():
        for key in sorted(LEAVES):
            requests = {
                "file": {"yaml": _config_text(key, value), "overrides": [], "cli": False},
                "override": {"yaml": "{}\n", "overrides": [f"{key}={value}"], "cli": False},
            }
            for how, request in requests.items():
                answer = worker.ask(request)
                try:
                    _check_answer(answer, key, f"{key}: {name} ({how})", False)
                except AssertionError:
                    failures.append(f"{key}: {name} ({how}): {answer}"[:400])
    assert not failures, f"{len(failures)} failures, e.g.:\n" + "\n".join(failures[:: max(1, len(failures) // 20)])


hostile_values = st.recursive(
    st.one_of(
        st.sampled_from(sorted(HOSTILE.values())),
        st.integers().map(str),
        st.floats().map(
            lambda x: ".nan" if math.isnan(x) else ".inf" if x == math.inf else "-.inf" if x == -math.inf else repr(x)
        ),
        st.text(max_size=20).map(json.dumps),  # a double-quoted YAML string: any character, escaped
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: f"[{', '.join(items)}]"),
        st.dictionaries(st.from_regex(r"[a-z]{1,3}", fullmatch=True), inner, max_size=3).map(
            lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"
        ),
    ),
    max_leaves=8,
)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(LEAVES)), value=hostile_values, as_override=st.booleans())
def test_hostile_values_through_the_cli(worker, key, value, as_override):
    """`vimoe launch local --dry-run` with a hostile value in the file or as an override: exit 0, or exit 2 with one
    line, within 2 s."""
    request = {"yaml": "{}\n", "overrides": [f"{key}={value}"], "cli": True}
    if not as_override:
        request = {"yaml": _config_text(key, value), "overrides": [], "cli": True}
    _check_answer(worker.ask(request), key, f"{key}={value[:200]}", True)


# ---------------------------------------------------------------------------------------------------- hostlists


@st.composite
def bracket_group(draw):
    """One `[...]` group as (text, expansion): comma items, each a number or a zero-padded/plain range."""
    items, names = [], []
    for _ in range(draw(st.integers(1, 3))):
        lo = draw(st.integers(0, 120))
        width = draw(st.sampled_from([0, 0, 2, 3]))
        lo_text = str(lo).zfill(width) if width else str(lo)
        padded = lo_text.startswith("0") and len(lo_text) > 1
        if draw(st.booleans()):
            hi = lo + draw(st.integers(0, 6))
            items.append(f"{lo_text}-{hi}")
            names += [str(n).zfill(len(lo_text)) if padded else str(n) for n in range(lo, hi + 1)]
        else:
            items.append(lo_text)
            names.append(lo_text)
    return "[" + ",".join(items) + "]", names


@st.composite
def host_item(draw):
    """One comma-free hostlist item and its expansion: prefix, then groups separated by literal text."""
    prefix = draw(st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True))
    parts, options = [prefix], [[prefix]]
    for i in range(draw(st.integers(0, 2))):
        if i:  # literal text between two groups (text after the last group is an error in Slurm)
            sep = draw(st.sampled_from(["", "-", "x"]))
            parts.append(sep)
            options.append([sep])
        text, names = draw(bracket_group())
        parts.append(text)
        options.append(names)
    return "".join(parts), ["".join(combo) for combo in itertools.product(*options)]


@SETTINGS
@given(items=st.lists(host_item(), min_size=1, max_size=4))
def test_hostlist_expansion_matches_the_structure(items):
    expr = ",".join(text for text, _ in items)
    expected = [host for _, hosts in items for host in hosts]
    assert expand_hostlist(expr) == expected
    assert first_host(expr) == expected[0]
    # a comma list is the concatenation of its items
    assert expand_hostlist(expr) == [h for text, _ in items for h in expand_hostlist(text)]


@SETTINGS
@given(text=st.text(alphabet="ab01-9[],x ", max_size=24))
def test_any_text_expands_or_is_a_user_error(text):
    try:
        hosts = expand_hostlist(text)
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert all(isinstance(h, str) and h and "[" not in h and "]" not in h and "," not in h for h in hosts)


@SETTINGS
@given(runs=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 5)), min_size=1, max_size=5))
def test_tasks_per_node_round_trip(runs):
    expr = ",".join(f"{n}(x{r})" if r > 1 else str(n) for n, r in runs)
    assert expand_tasks_per_node(expr) == [n for n, r in runs for _ in range(r)]


@SETTINGS
@given(text=st.text(alphabet="0123456789(x),  ", max_size=16))
def test_tasks_per_node_any_text_expands_or_is_a_user_error(text):
    try:
        counts = expand_tasks_per_node(text)
    except UserError:
        return
    assert all(isinstance(c, int) and c >= 0 for c in counts)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _serve(sys.argv[2])
