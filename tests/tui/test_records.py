"""The pieces RunState is made of: the speed window and folding a batch read from the file."""

from __future__ import annotations

from tarflow_cli.tui.records import StepRate
from tarflow_cli.tui.state import RunState


def test_step_rate_spans_the_last_two_minutes_and_needs_two_points():
    rate = StepRate()
    assert rate.per_second() is None
    rate.add(0.0, 0)
    assert rate.per_second() is None
    rate.add(10.0, 100)
    assert rate.per_second() == 10.0
    rate.add(200.0, 200)  # the first point is now outside the window; two points are always kept
    assert rate.per_second() == (200 - 100) / (200.0 - 10.0)
    rate.add(210.0, 150)  # steps that went back (a resumed run) give no rate
    assert rate.per_second() is None
    rate.clear()
    assert rate.per_second() is None


def test_a_batch_is_folded_in_file_order(tmp_path):
    state = RunState(tmp_path)
    events = [{"kind": "warning", "message": f"w{k}", "step": k} for k in range(3)]
    changed = state.apply_read(events, ["line 2: junk", "line 5: junk"], [1, 3])
    assert [line.text for line in state.log] == ["w0", "skipped line 2: junk", "w1", "w2", "skipped line 5: junk"]
    assert changed == {"header", "log"}
    # without positions, the problems come after the batch's events
    state.clear()
    state.apply_read(events[:1], ["line 9: junk"], None)
    assert [line.text for line in state.log] == ["w0", "skipped line 9: junk"]
