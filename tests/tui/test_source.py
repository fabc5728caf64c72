"""The events.jsonl tailer: partial lines, bad lines, truncation, replacement, missing paths."""

from __future__ import annotations

import json
import os

from tarflow_cli.tui.source import MISSING_DIR, MISSING_FILE, READING, EventTail, resolve_events_path


def line(**e) -> str:
    return json.dumps({"time": 1.0, "step": 0, **e}) + "\n"


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_missing_dir_then_file_then_lines(tmp_path):
    run = tmp_path / "run"
    tail = EventTail(run / "events.jsonl")
    assert tail.poll().state == MISSING_DIR
    run.mkdir()
    assert tail.poll().state == MISSING_FILE
    (run / "events.jsonl").write_text(line(kind="start") + line(kind="train", step=5))
    read = tail.poll()
    assert read.state == READING and [e["kind"] for e in read.events] == ["start", "train"]
    assert tail.poll().events == []


def test_half_written_line_waits_for_its_newline(tmp_path):
    p = tmp_path / "events.jsonl"
    full = line(kind="train", step=7)
    p.write_text(line(kind="start") + full[:10])
    tail = EventTail(p)
    assert [e["kind"] for e in tail.poll().events] == ["start"]
    with open(p, "a") as f:
        f.write(full[10:])
    assert [e["step"] for e in tail.poll().events] == [7]


def test_unterminated_last_line_is_taken_once_settled(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text(line(kind="start") + line(kind="end", status="finished").rstrip("\n"))
    clock = Clock()
    tail = EventTail(p, settle=2.0, clock=clock)
    assert [e["kind"] for e in tail.poll().events] == ["start"]
    assert tail.poll().events == []
    clock.t = 5.0
    assert [e["kind"] for e in tail.poll().events] == ["end"]
    assert tail.poll().events == []


def test_malformed_lines_become_problems(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text(line(kind="start") + "{not json\n" + "[1, 2]\n" + '{"step": 3}\n' + "\n" + line(kind="train", step=1))
    read = EventTail(p).poll()
    assert [e["kind"] for e in read.events] == ["start", "train"]
    assert len(read.problems) == 3
    assert "line 2" in read.problems[0] and "not valid JSON" in read.problems[0]
    assert "JSON object" in read.problems[1]
    assert "kind" in read.problems[2]


def test_truncated_file_starts_over(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text(line(kind="start") + line(kind="train", step=1) + line(kind="train", step=2))
    tail = EventTail(p)
    assert len(tail.poll().events) == 3
    with open(p, "r+") as f:  # same inode, shorter content
        f.truncate(0)
        f.write(line(kind="start", step=0))
    read = tail.poll()
    assert read.reset and "truncated" in read.reset
    assert [e["kind"] for e in read.events] == ["start"]


def test_replaced_file_starts_over(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text(line(kind="start") + line(kind="train", step=1))
    tail = EventTail(p)
    assert len(tail.poll().events) == 2
    new = tmp_path / "new.jsonl"
    new.write_text(line(kind="start", note="second") + line(kind="train", step=1) + line(kind="train", step=2))
    os.replace(new, p)
    read = tail.poll()
    assert read.reset and "replaced" in read.reset
    assert read.events[0]["note"] == "second" and len(read.events) == 3


def test_rewritten_in_place_is_noticed(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text(line(kind="start", run="a"))
    tail = EventTail(p)
    tail.poll()
    with open(p, "r+") as f:
        f.write(line(kind="start", run="b") + line(kind="train", step=1))
    read = tail.poll()
    assert read.reset and read.events[0]["run"] == "b"


def test_big_file_comes_in_chunks(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text("".join(line(kind="train", step=i) for i in range(2000)))
    tail = EventTail(p, chunk=4096)
    steps, polls = [], 0
    while True:
        read = tail.poll()
        polls += 1
        steps += [e["step"] for e in read.events]
        if not read.more:
            break
    assert steps == list(range(2000)) and polls > 10


def test_resolve_events_path(tmp_path):
    assert resolve_events_path(tmp_path / "r") == (tmp_path / "r", tmp_path / "r" / "events.jsonl")
    assert resolve_events_path(tmp_path / "r" / "x.jsonl") == (tmp_path / "r", tmp_path / "r" / "x.jsonl")
