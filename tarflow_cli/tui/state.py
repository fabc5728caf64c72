"""What the dashboard knows about a run, folded from its events; plain Python, no Textual.

`RunState.apply(event)` takes one `events.jsonl` object (any kind, any fields: unknown ones are
ignored, missing ones are fine) and returns the names of the panels it changed
(`header`, `charts`, `samples`, `log`); `RunState.apply_read` folds a batch as the file tail
reads it. What it holds (series, log lines, sample grids) is defined in `records.py`. The app
owns one `RunState` and touches it only from the UI thread.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from .records import LogLine, SampleGrid, Series, StepRate

FINAL = ("finished", "interrupted", "failed")

# chart series, by name
# eval_bpd_uniform: a variational run's held-out bpd with uniform dequantization (eval_bpd is its bound)
SERIES = ("loss", "bpd", "eval_bpd", "eval_bpd_uniform", "lr", "images_per_s")


_FINITE_MAX = 1.7976931348623157e308


def number(v: Any) -> float | None:
    """A finite float from an event field, else None ("nan" strings and junk included)."""
    t = type(v)
    if t is float:  # the common case, fast
        return v if -_FINITE_MAX <= v <= _FINITE_MAX else None
    if t is int:
        return float(v)
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def _first(d: dict, *names: str) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return None


class RunState:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.clear()

    def clear(self) -> None:
        self.name = self.run_dir.name or str(self.run_dir)
        self.source_state = "reading"  # the file: missing-dir, missing-file, reading
        self.status = "waiting"  # waiting, running, + FINAL
        self.stopping = False
        self.end_reason: str | None = None
        self.start_time: float | None = None
        self.end_time: float | None = None
        self.last_time: float | None = None
        self.earlier_sessions = 0.0  # seconds trained before the latest start (a resumed run's earlier sessions)
        self.step: int = 0
        self.max_steps: int | None = None
        self.epoch: float | None = None
        self.steps_per_epoch: float | None = None
        self.device: str | None = None
        self.batch: str | None = None  # "256 (4 x 64)": the global batch and its micro-batches, when told
        self._memory_raw: Any = None
        self.params: int | None = None
        self.data: str | None = None
        self.preset: str | None = None
        self.image_size: int | None = None
        self.sample_every: int | None = None
        self.series: dict[str, Series] = {k: Series() for k in SERIES}
        self.latest: dict[str, float] = {}
        self.samples: list[SampleGrid] = []
        self.log: list[LogLine] = []
        self.log_dropped = 0  # lines trimmed off the front of `log`
        self.warnings = 0
        self.events = 0
        self._rate = StepRate()

    # --------------------------------------------------------------------------- folding
    def apply(self, e: dict) -> set[str]:
        kind = e.get("kind")
        t = number(e.get("time"))
        step = number(e.get("step"))
        changed = {"header"}
        self.events += 1
        if kind == "start" and self.start_time is not None:  # the session before it counts towards the run's time
            self.earlier_sessions, self.start_time = self.earlier_sessions + _session_time(self), None
        if t is not None:
            self.last_time = t
        if step is not None and kind != "start":
            self.step = max(self.step, int(step)) if kind != "train" else int(step)
        handler = getattr(self, f"_on_{kind}", None) if isinstance(kind, str) else None
        if handler is not None:
            changed |= handler(e, t, None if step is None else int(step)) or set()
        return changed

    def apply_read(self, events: list[dict], problems: list[str], problems_at: list[int] | None) -> set[str]:
        """Fold a batch read from the file in file order: a line that is not an event is noted where
        it was (`problems_at[k]`: how many events came before problem k; None: all), not after the batch."""
        if problems_at is None or len(problems_at) != len(problems):
            problems_at = [len(events)] * len(problems)
        changed: set[str] = set()
        pending = deque(zip(problems_at, problems))
        for i, event in enumerate(events):
            while pending and pending[0][0] <= i:
                self.note("warning", f"skipped {pending.popleft()[1]}")
                changed.add("log")
            changed |= self.apply(event)
        for _, problem in pending:
            self.note("warning", f"skipped {problem}")
            changed.add("log")
        return changed

    def _on_start(self, e: dict, t: float | None, step: int | None) -> set[str]:
        resumed = self.status != "waiting" or (step or 0) > 0
        self._restart(t, step or 0)
        cfg = e.get("config") if isinstance(e.get("config"), dict) else {}
        train_cfg = cfg.get("train") if isinstance(cfg.get("train"), dict) else cfg
        ms = number(_first(e, "max_steps", "total_steps")) or number(_first(train_cfg, "max_steps", "total_steps"))
        self.max_steps = int(ms) if ms else None
        self.device = str(_first(e, "device") or _first(train_cfg, "device") or "") or self.device
        self.preset = _first(train_cfg, "preset") or self.preset
        self.batch = _batch(e) or self.batch
        every = number(_first(train_cfg, "sample_every"))
        self.sample_every = int(every) if every is not None else self.sample_every
        params = number(_first(e, "params", "parameters", "num_params", "parameter_count"))
        self.params = int(params) if params else self.params
        data = e.get("data")
        if isinstance(data, dict):
            info = _describe_data(data, e, train_cfg)
            self.data = info.text
            if info.image_size is not None:
                self.image_size = info.image_size
            if info.steps_per_epoch is not None:
                self.steps_per_epoch = info.steps_per_epoch
        elif isinstance(data, str):
            self.data = data
        if self.image_size is None:
            model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
            size = number(_first(model, "img_size", "image_size")) or number(_first(train_cfg, "image_size"))
            if size:
                self.image_size = int(size)
        if self.max_steps is None and self.steps_per_epoch:
            epochs = number(_first(train_cfg, "epochs"))
            if epochs:
                self.max_steps = int(math.ceil(epochs * self.steps_per_epoch))
        name = _first(e, "name", "run_name")
        if name:
            self.name = str(name)
        what = f"resumed at step {step:,}" if resumed and step else "started"
        shown = (self.preset and f"preset {self.preset}", self.data, self.params and f"{self.params:,} parameters")
        bits = [b for b in (*shown, self.device) if b]
        self._log("event", f"run {what}" + (f": {', '.join(bits)}" if bits else ""), step, t)
        return {"charts", "samples", "log"}

    def _restart(self, t: float | None, step: int) -> None:
        """A start event: running from `step`; what came after `step` is gone (a resumed run
        repeats those steps from its checkpoint)."""
        self.start_time = t  # `apply` has added the session before to `earlier_sessions`
        self.status = "running"
        self.stopping = False
        self.end_reason = None
        self.end_time = None
        self.step = step
        self._rate.clear()
        for s in self.series.values():
            s.cut(self.step)
        self.samples = [g for g in self.samples if g.step <= self.step]

    def _on_train(self, e: dict, t: float | None, step: int | None) -> set[str]:
        if self.status == "waiting":
            self.status = "running"
        if self.start_time is None:
            self.start_time = t
        if step is None:
            return set()
        series, latest = self.series, self.latest
        for key, names in _TRAIN_SERIES:
            for name in names:
                if name in e:
                    v = number(e[name])
                    if v is not None:
                        series[key].add(step, v)
                        latest[key] = v
                    break
        for key in _TRAIN_LATEST:
            if key in e:
                v = number(e[key])
                if v is not None:
                    latest[key] = v
        epoch = number(e.get("epoch"))
        if epoch is not None:
            self.epoch = epoch
        elif self.steps_per_epoch:
            self.epoch = step / self.steps_per_epoch
        for name in _MEMORY_FIELDS:
            if name in e:
                self._memory_raw = e[name]
                break
        if t is not None:
            self._rate.add(t, step)
        return {"charts"}

    def _on_eval(self, e: dict, t: float | None, step: int | None) -> set[str]:
        v = number(_first(e, "bpd", "eval_bpd", "test_bpd", "val_bpd", "heldout_bpd"))
        if v is None or step is None:
            return set()
        _add_point(self, "eval_bpd", step, v)
        _add_point(self, "eval_bpd_uniform", step, number(e.get("bpd_uniform")))  # a variational run's, beside
        return {"charts"}

    def _on_sample(self, e: dict, t: float | None, step: int | None) -> set[str]:
        grid = _sample_grid(e, step or 0)
        if grid is None:
            return set()
        self.samples = [g for g in self.samples if g.path != grid.path] + [grid]
        return {"samples"}

    def _on_checkpoint(self, e: dict, t: float | None, step: int | None) -> set[str]:
        path = str(_first(e, "path") or "")
        shown = _short_path(path, self.run_dir)
        self._log("event", f"checkpoint saved{': ' + shown if shown else ''}", step, t)
        return {"log"}

    def _on_warning(self, e: dict, t: float | None, step: int | None) -> set[str]:
        msg = _first(e, "message", "msg", "text", "warning") or "warning (no message)"
        self.warnings += 1
        self._log("warning", str(msg), step, t)
        return {"log"}

    def _on_end(self, e: dict, t: float | None, step: int | None) -> set[str]:
        status = str(e.get("status") or "finished").lower()
        self.status = status if status in FINAL else "finished"
        self.stopping = False
        self.end_time = t
        reason = _first(e, "reason", "message", "error")
        self.end_reason = str(reason) if reason else None
        level = {"finished": "event", "interrupted": "warning"}.get(self.status, "error")
        self._log(level, f"run {self.status}" + (f": {self.end_reason}" if self.end_reason else ""), step, t)
        return {"log"}

    # ------------------------------------------------------------------------- additions
    def note(self, level: str, text: str) -> None:
        """A line from the viewer itself (a malformed event line, a missing image, ...)."""
        if level == "warning":
            self.warnings += 1
        self._log(level, text, None, None)

    def training_failed(self, error: str, clock: Callable[[], float]) -> None:
        """The training in this process raised `error`; unless the run said it ended, it failed now."""
        self.note("error", f"training stopped with an error: {error}")
        if self.status not in FINAL:
            self.status = "failed"
            self.end_reason = error
            self.end_time = clock()

    def _log(self, level: str, text: str, step: int | None, t: float | None) -> None:
        self.log.append(LogLine(level, text, step, t))
        if len(self.log) > 2000:
            del self.log[:500]
            self.log_dropped += 500

    # ---------------------------------------------------------------------------- derived
    @property
    def memory(self) -> str | None:
        """Memory of the last report, readable (MiB when a bare number is small)."""
        return _memory(self._memory_raw)

    def elapsed(self, now: float | None = None) -> float | None:  # over all the run's sessions
        return None if self.start_time is None else self.earlier_sessions + self.session_elapsed(now)

    def session_elapsed(self, now: float | None = None) -> float | None:
        if self.start_time is None:
            return None
        end = self.end_time if self.status in FINAL and self.end_time else (now if now is not None else time.time())
        return max(0.0, end - self.start_time)

    def steps_per_second(self) -> float | None:
        return self._rate.per_second()

    def eta(self, now: float | None = None) -> float | None:
        if self.status != "running" or not self.max_steps:
            return None
        rate = self.steps_per_second()
        if not rate:
            return None
        remaining = max(0, self.max_steps - self.step)
        eta = remaining / rate
        if now is not None and self.last_time is not None:
            eta -= max(0.0, now - self.last_time)  # time already spent since the last report
        return max(0.0, eta)


def _add_point(state: RunState, key: str, step: int, value: float | None) -> None:
    """A point of chart series `key` and its latest value (nothing for a missing value)."""
    if value is not None:
        state.series[key].add(step, value)
        state.latest[key] = value


def _session_time(state: RunState) -> float:
    """How long the session that a new start ends trained: to its end event, else to its last event."""
    end = state.end_time if state.status in FINAL and state.end_time else state.last_time
    return max(0.0, (end or 0.0) - (state.start_time or 0.0))


_TRAIN_SERIES = (
    ("loss", ("loss",)),
    ("bpd", ("bpd", "train_bpd")),
    ("lr", ("lr", "learning_rate")),
    ("images_per_s", ("images_per_s", "img_per_s", "images_per_sec", "throughput")),
)
_TRAIN_LATEST = ("nll", "logdet", "grad_norm", "tflops", "mfu")
_MEMORY_FIELDS = ("memory_mb", "memory", "mem", "max_memory", "memory_bytes")


def _sample_grid(e: dict, step: int) -> SampleGrid | None:
    """The grid a sample event names, or None when it names no file."""
    path = _first(e, "path", "image", "file")
    if not isinstance(path, str) or not path:
        return None
    nrow = number(_first(e, "nrow", "ncol", "columns", "cols"))
    tile = number(_first(e, "tile", "tile_size"))
    pad = number(_first(e, "padding"))
    num = number(_first(e, "num", "count", "num_images"))
    return SampleGrid(
        step,
        Path(path),
        int(nrow) if nrow else None,
        int(tile) if tile else None,
        int(pad) if pad is not None else None,
        int(num) if num else None,
    )


class _DataInfo(NamedTuple):
    """What a start event's `data` object says, for the header."""

    text: str | None  # "name · 60,000 images · 1x28x28 · 10 classes"
    image_size: int | None
    steps_per_epoch: float | None


def _describe_data(data: dict, e: dict, train_cfg: dict) -> _DataInfo:
    name = _first(data, "name", "source", "path") or ""
    n_train = next(
        (
            number(data[k])
            for k in ("train_images", "num_train", "train_size", "n_train", "train")
            if number(data.get(k)) is not None
        ),
        None,
    )
    shape = _first(data, "shape")
    if not isinstance(shape, (list, tuple)) and number(data.get("image_size")):
        c = number(data.get("channels"))
        shape = ([int(c)] if c else []) + [int(number(data["image_size"]))] * 2  # type: ignore[arg-type]
    bits = [str(name)] if name else []
    if n_train:
        bits.append(f"{int(n_train):,} images")
    if isinstance(shape, (list, tuple)) and shape:
        bits.append("x".join(str(s) for s in shape))
    classes = number(_first(data, "num_classes", "classes"))
    if classes:
        bits.append(f"{int(classes)} classes")
    size = number(_first(data, "image_size", "size"))
    spe = number(_first(data, "steps_per_epoch")) or number(_first(e, "steps_per_epoch"))
    batch = number(_first(e, "global_batch")) or number(_first(train_cfg, "batch_size"))
    if not spe:
        spe = n_train / batch if n_train and batch else None
    return _DataInfo(" · ".join(bits) or None, int(size) if size else None, spe)


def _batch(e: dict) -> str | None:
    """The global batch as processes x accumulation x micro-batch: "64", "256 (4 x 64)", "256 (2 x 2 x 64)".
    None for runs whose start event does not tell the micro-batch (older versions)."""
    total, micro, steps = (number(e.get(k)) for k in ("global_batch", "micro_batch", "accumulation"))
    if not (total and micro and steps):
        return None
    world = number(e.get("world_size")) or 1
    parts = [int(v) for v in (world, steps) if v > 1] + [int(micro)]
    return f"{int(total)}" + (f" ({' x '.join(map(str, parts))})" if len(parts) > 1 else "")


def _memory(v: Any) -> str | None:
    """A readable memory figure from bytes, MiB/GiB numbers, or a dict of them."""
    if isinstance(v, dict):
        for key in ("max_allocated", "peak", "allocated", "reserved", "rss", "used"):
            if key in v:
                return _memory(v[key])
        return None
    if isinstance(v, str):
        return v or None
    f = number(v)
    if f is None or f <= 0:
        return None
    if f < 1 << 16:  # a small number is already in MiB
        f *= 1 << 20
    return format_bytes(f)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h >= 48:
        return f"{h // 24}d{h % 24:02d}h"
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _short_path(path: str, run_dir: Path) -> str:
    try:
        return str(Path(path).relative_to(run_dir))
    except ValueError:
        return path
