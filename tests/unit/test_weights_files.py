"""Weights files that do not fit are one line naming the tensor: a truncated safetensors file, one whose header size
is impossible or not JSON (`model.pretrained`, `--checkpoint FILE`), weights of another width given to the analysis
loader; and `vimoe export --out` into a directory that does not exist is one line before any work."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file
from support import TINY_RUN

from vimoe_dist.analysis.loading import load_weights_file
from vimoe_dist.cli import main
from vimoe_dist.config import ConfigError, load_config
from vimoe_dist.errors import UserError
from vimoe_dist.model import build_model, load_state_dict_file

MODEL = [o for o in TINY_RUN if not o.startswith("data.")]


@pytest.fixture
def weights(tmp_path):
    cfg = load_config("configs/digits.yaml", MODEL)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(cfg.model).state_dict().items()}, str(path))
    return path


def test_a_truncated_safetensors_file_names_the_tensor_cut_off(weights):
    data = weights.read_bytes()
    weights.write_bytes(data[:-3000])
    with pytest.raises(ConfigError) as e:
        load_state_dict_file(weights)
    msg = str(e.value)
    assert msg.startswith(f"model.pretrained: {str(weights)!r} is truncated: tensor ") and "\n" not in msg, msg
    name = msg.split("tensor ")[1].split(" ")[0]
    assert name in build_model(load_config("configs/digits.yaml", MODEL).model).state_dict()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ((2**40).to_bytes(8, "little") + b"{}", "declares a header of 1,099,511,627,776 bytes in a file of 10 bytes"),
        ((4).to_bytes(8, "little") + b"\xff\xfe{}", "has a header that is not JSON"),
        (b"\x01\x02", "is 2 bytes long, shorter than a safetensors header"),
        ((2).to_bytes(8, "little") + b"[]", "has a header that is not a JSON object"),
    ],
)
def test_a_broken_safetensors_header_is_one_line(tmp_path, content, problem):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"^--checkpoint: ") as e:
        load_state_dict_file(path, what="--checkpoint")
    assert problem in str(e.value)


def test_weights_of_another_width_name_the_tensor(weights):
    wide = [o if "backbone_kwargs" not in o else o.replace("embed_dim: 32", "embed_dim: 64") for o in MODEL]
    cfg = load_config("configs/digits.yaml", wide)
    with pytest.raises(UserError) as e:
        load_weights_file(cfg, weights)
    assert str(e.value) == (
        f"--checkpoint {weights}: does not fit this model: blocks.0.attn.proj.bias is (32,), the model's is (64,)"
    )


def test_export_into_a_missing_directory_is_one_line(tmp_path, capsys):
    out = tmp_path / "missing" / "model.safetensors"
    with pytest.raises(SystemExit) as e:
        main(["export", "--config", "configs/digits.yaml", "--checkpoint", str(tmp_path), "--out", str(out)])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"vimoe export: error: --out {out}: the directory {str(out.parent)!r} does not exist\n"
    )
