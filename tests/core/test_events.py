"""events.py: event helpers, the JSONL sink and a tolerant reader."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tarflow_core.events import JsonlSink, dumps, fanout, last_event, make_event, read_events


def test_make_event_fields():
    e = make_event("train", 5, loss=1.5)
    assert e["kind"] == "train" and e["step"] == 5 and e["loss"] == 1.5
    assert abs(e["time"] - time.time()) < 5
    with pytest.raises(ValueError):
        make_event("bogus", 0)


def test_dumps_non_finite_and_paths(tmp_path):
    line = dumps({"kind": "train", "step": 1, "loss": float("nan"), "p": tmp_path, "inf": float("inf")})
    obj = json.loads(line)
    assert obj["loss"] == "nan" and obj["inf"] == "inf" and obj["p"] == str(tmp_path)
    assert "\n" not in line


def test_sink_appends_and_flushes(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    sink(make_event("start", 0))
    # visible to another reader before close (flushed per event)
    assert [e["kind"] for e in read_events(path)] == ["start"]
    sink(make_event("end", 3, status="finished"))
    sink.close()
    sink(make_event("train", 4))  # after close: ignored, no crash
    with JsonlSink(path) as again:  # append mode keeps old lines
        again(make_event("warning", 5, message="x"))
    kinds = [e["kind"] for e in read_events(path)]
    assert kinds == ["start", "end", "warning"]
    assert last_event(path, "end")["status"] == "finished"


def test_sink_after_a_killed_writer_starts_on_a_new_line(tmp_path):
    """A run killed mid-write leaves a line without its newline; the resumed run's events must not
    be glued onto it (its `start` would be lost to every viewer)."""
    path = tmp_path / "events.jsonl"
    with JsonlSink(path) as sink:
        sink(make_event("start", 0))
    with open(path, "a") as f:
        f.write('{"time":1,"kind":"tra')
    with JsonlSink(path) as sink:
        sink(make_event("start", 7, resumed_from="x"))
        sink(make_event("end", 8, status="finished"))
    lines = path.read_text().splitlines()
    assert lines[1] == '{"time":1,"kind":"tra'
    assert [json.loads(line)["kind"] for line in lines[2:]] == ["start", "end"]
    assert [(e["kind"], e["step"]) for e in read_events(path)] == [("start", 0), ("start", 7), ("end", 8)]


def test_read_tolerates_half_written_and_bad_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    good = [make_event("start", 0), make_event("train", 1, loss=0.5)]
    path.write_text("\n".join(dumps(e) for e in good) + "\nnot json\n[1,2]\n" + '{"kind": "train", "st')
    got = list(read_events(path))
    assert [e["step"] for e in got] == [0, 1]


def test_follow_completes_partial_line_and_stops_at_end(tmp_path):
    path = tmp_path / "events.jsonl"
    seen = []
    stop = threading.Event()

    def reader():
        for e in read_events(path, follow=True, poll=0.01, stop=stop):
            seen.append(e)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.05)  # file does not exist yet: the reader waits
    with open(path, "w") as f:
        line = dumps(make_event("train", 1, loss=1.0))
        f.write(line[:10])
        f.flush()
        time.sleep(0.05)
        f.write(line[10:] + "\n")
        f.flush()
        time.sleep(0.05)
        f.write(dumps(make_event("end", 2, status="finished")) + "\n")
    t.join(timeout=5)
    assert not t.is_alive()
    assert [e["kind"] for e in seen] == ["train", "end"]


def test_follow_stop_callable(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(dumps(make_event("start", 0)) + "\n")
    deadline = time.time() + 0.2
    got = list(read_events(path, follow=True, poll=0.01, stop=lambda: time.time() > deadline))
    assert [e["kind"] for e in got] == ["start"]


def test_fanout_calls_each():
    a, b = [], []
    fanout(a.append, None, b.append)({"kind": "x"})
    assert a == b == [{"kind": "x"}]
