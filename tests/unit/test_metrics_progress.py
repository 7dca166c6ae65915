"""The progress helper of long loops (eval, analyze routing, prune, study): a tqdm bar on a terminal, plain lines at a
bounded rate in a log, nothing on ranks other than 0."""

from __future__ import annotations

import io

from vimoe_dist.metrics.progress import Progress, track


class Clock:
    """Seconds that the test advances (the helper takes its clock as a parameter)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_in_a_log_are_bounded_in_rate():
    out, clock = io.StringIO(), Clock()

    def batches():
        for i in range(1000):
            clock.now += 0.125  # 125 s in all, 8 batches/s
            yield i

    seen = list(track(batches(), "analyze routing", total=1000, stream=out, every_s=30, clock=clock))
    assert seen == list(range(1000))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "analyze routing: starting, 1000 batches"
    assert len(lines) == 2 + 4  # the first, one per 30 s of 125 s, the last
    assert lines[1] == "analyze routing: 240/1000 batches (24%), 8 batch/s, eta 0:01:35"
    assert lines[-1] == "analyze routing: 1000/1000 batches in 0:02:05 (8 batch/s)"


def test_total_from_len_and_unknown_totals():
    out = io.StringIO()
    assert list(track([1, 2, 3], "eval", stream=out)) == [1, 2, 3]
    assert out.getvalue().splitlines()[0] == "eval: starting, 3 batches"
    out, clock = io.StringIO(), Clock()
    with Progress(None, "study", unit="point", stream=out, every_s=0, clock=clock) as p:
        for _ in range(2):
            clock.now += 5
            p.update()
    lines = out.getvalue().splitlines()
    assert lines == ["study: starting", "study: 1 point, 0.2 point/s", "study: 2 points, 0.2 point/s",
                     "study: 2 points in 0:00:10 (0.2 point/s)"]  # fmt: skip


def test_a_bar_on_a_terminal_and_nothing_when_disabled():
    out = io.StringIO()
    with Progress(50, "prune: before", stream=out, bar=True) as p:
        for _ in range(50):
            p.update()
    assert "prune: before" in out.getvalue() and "50/50" in out.getvalue()
    quiet = io.StringIO()
    assert list(track(range(5), "eval", stream=quiet, enabled=False)) == list(range(5))
    assert quiet.getvalue() == ""


def test_analyze_routing_shows_its_progress(capsys):
    import torch

    from vimoe_dist.analysis.collect import run_routing
    from vimoe_dist.config import load_config
    from vimoe_dist.model import build_model

    tiny = ["model.img_size=28", "model.num_classes=10", "model.moe.num_experts=4", "model.moe.group_size=2"]
    cfg = load_config(None, [*tiny, "model.backbone_kwargs={embed_dim: 32, num_heads: 2, depth: 2}"])
    model = build_model(cfg.model)
    batches = [(torch.randn(4, 3, 28, 28), torch.zeros(4, dtype=torch.long)) for _ in range(3)]
    run_routing(model, batches, 10, desc="analyze routing")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "analyze routing: starting, 3 batches" and lines[-1].startswith(
        "analyze routing: 3/3 batches in"
    )
