"""`data.order`: exact is the default (a resume continues with the very batches it would have had), and a source the
exact order cannot read by random access is one line saying what to set, before anything is built."""

import pytest

from vimoe_dist.config import load_config
from vimoe_dist.data.splits import resolve
from vimoe_dist.errors import UserError


def test_exact_is_the_default():
    assert load_config(None, []).data.order == "exact"


@pytest.mark.parametrize(
    ("train", "needs"),
    [
        ("http://127.0.0.1:9/train-{000000..000003}.tar", "needs local files"),
        ("pipe:cat /data/train-000000.tar", "needs local files"),
        ("{tmp}/train-{000000..000001}.tar.gz", "needs uncompressed tars"),
    ],
)
def test_a_source_exact_order_cannot_read_says_what_to_set(tmp_path, train, needs):
    for i in range(2):
        (tmp_path / f"train-{i:06d}.tar.gz").write_bytes(b"\x1f\x8b" + bytes(1024))
    cfg = load_config(None, [f"data.train={train.replace('{tmp}', str(tmp_path))}", "data.allow_pipe=true"])
    with pytest.raises(UserError) as e:
        resolve(cfg, "data.train", need_counts=False)
    message = str(e.value)
    assert "\n" not in message and needs in message and "set data.order=stream" in message, message
    # and what the message says to set works
    cfg.data.order = "stream"
    assert resolve(cfg, "data.train", need_counts=False).urls
