"""The dashboard header tells the global batch and how it is split (processes x accumulation x
micro-batch) when the run's start event says so; older runs' events display as before."""

from __future__ import annotations

from tarflow_cli.tui.state import RunState
from tarflow_cli.tui.widgets.run_header import _details_line

from .test_state import START, T0


def header(**fields) -> tuple[str | None, str]:
    s = RunState("runs/x")
    s.apply({**START, **fields})
    return s.batch, _details_line(s, T0 + 5, 120.0, 0).plain


def test_the_split_of_the_global_batch_is_shown():
    batch, line = header(global_batch=256, micro_batch=64, accumulation=4, world_size=1)
    assert batch == "256 (4 x 64)" and "device cpu  batch 256 (4 x 64)" in line
    assert header(global_batch=256, micro_batch=64, accumulation=2, world_size=2)[0] == "256 (2 x 2 x 64)"
    assert header(global_batch=64, micro_batch=64, accumulation=1, world_size=1)[0] == "64"


def test_a_start_event_without_the_micro_batch_displays_as_before():
    batch, line = header(global_batch=64)
    assert batch is None and "batch" not in line and "device cpu" in line
    assert header(global_batch=64, micro_batch="x", accumulation=None)[0] is None
