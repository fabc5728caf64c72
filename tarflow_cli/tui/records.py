"""The records a run's state is made of: chart series, log lines, sample grids. Plain Python."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tarflow_core.events import grid_candidates


class Series:
    """(step, value) points in step order; `arrays()` gives numpy views, converted incrementally."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.values: list[float] = []
        self._buf = np.empty((2, 0))
        self._synced = 0

    def add(self, step: float, value: float) -> None:
        if self.steps and step < self.steps[-1]:
            self.cut(step)
        self.steps.append(step)
        self.values.append(value)

    def cut(self, step: float) -> None:
        """Drop the points after `step` (a resumed run starts again from its checkpoint)."""
        while self.steps and self.steps[-1] > step:
            self.steps.pop()
            self.values.pop()
        self._synced = min(self._synced, len(self.steps))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.steps)
        if n > self._buf.shape[1]:
            grown = np.empty((2, max(n, 2 * self._buf.shape[1], 1024)))
            grown[:, : self._synced] = self._buf[:, : self._synced]
            self._buf = grown
        if self._synced < n:
            self._buf[0, self._synced : n] = self.steps[self._synced :]
            self._buf[1, self._synced : n] = self.values[self._synced :]
            self._synced = n
        return self._buf[0, :n], self._buf[1, :n]

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class LogLine:
    level: str  # info, warning, error, event
    text: str
    step: int | None = None
    time: float | None = None


@dataclass
class SampleGrid:
    step: int
    path: Path  # as the event gave it
    nrow: int | None = None
    tile: int | None = None  # image size in pixels
    padding: int | None = None
    num: int | None = None  # images in the grid (the rest of its last row is empty)

    def candidates(self, run_dir: Path) -> list[Path]:
        """Where the file may be (`events.grid_candidates`: the run directory first)."""
        return grid_candidates(run_dir, str(self.path))


class StepRate:
    """Training speed in steps per second, over the train events of the last two minutes."""

    WINDOW = 120.0  # seconds

    def __init__(self) -> None:
        self._points: list[tuple[float, int]] = []  # (time, step), oldest first

    def clear(self) -> None:
        self._points.clear()

    def add(self, t: float, step: int) -> None:
        self._points.append((t, step))
        cutoff = t - self.WINDOW
        while len(self._points) > 2 and self._points[0][0] < cutoff:
            self._points.pop(0)

    def per_second(self) -> float | None:
        if len(self._points) < 2:
            return None
        (t0, s0), (t1, s1) = self._points[0], self._points[-1]
        if t1 <= t0 or s1 <= s0:
            return None
        return (s1 - s0) / (t1 - t0)
