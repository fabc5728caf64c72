"""`tarflow watch RUN_DIR`: follow a training run in the terminal dashboard."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..console import fail, info
from ..options import device_option, seed_option
from .numbers import finite_float

RunDirArg = Annotated[
    Path,
    typer.Argument(
        metavar="RUN_DIR",
        help="The run directory (or its events.jsonl). It may not exist yet: the dashboard waits for it.",
        show_default=False,
    ),
]
PollOpt = Annotated[
    float,
    typer.Option(
        "--poll", parser=finite_float(minimum=0.05, maximum=60.0), help="Seconds between reads of events.jsonl."
    ),
]
GraphicsOpt = Annotated[
    str,
    typer.Option(
        "--graphics",
        envvar="TARFLOW_GRAPHICS",
        help="Sample grids in auto, halfblock, kitty or sixel (kitty/sixel need the textual-image package).",
    ),
]
UnusedDeviceOpt = device_option("Accepted like every command's; watching computes nothing.", hidden=True)
UnusedSeedOpt = seed_option("Accepted like every command's; watching draws nothing random.", parser=None, hidden=True)


def watch(
    run_dir: RunDirArg,
    poll: PollOpt = 0.25,
    graphics: GraphicsOpt = "auto",
    device: UnusedDeviceOpt = "auto",
    seed: UnusedSeedOpt = 0,
) -> None:
    """Follow a training run, live or finished, in a terminal dashboard.

    Charts of bpd (train and held-out), loss, learning rate and images/s; step,
    epoch, ETA, device and memory; the newest sample grid; warnings and the end
    reason. Works for a run in another process or on another machine with a
    shared disk, and for finished runs.

    Keys: q quit (the run keeps going), ? help, r reload, [ and ] older/newer
    sample grids, z sample zoom.

    Examples:

      tarflow watch runs/tiny-20250101-120000

      tarflow train --run-dir runs/demo --ui plain &  tarflow watch runs/demo
    """
    if run_dir.exists() and not run_dir.is_dir() and run_dir.suffix != ".jsonl":
        fail(f"{run_dir} is a file; expected a run directory or its events.jsonl")
    why = not_a_run(run_dir)
    if why:
        fail(why)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        fail(
            "tarflow watch needs an interactive terminal; to follow a run in a script or a log, use "
            f"tail -f {run_dir / 'events.jsonl' if run_dir.suffix != '.jsonl' else run_dir}"
        )
    from ..tui.app import make_app
    from ..tui.graphics import CHOICES, pick_graphics

    if graphics.strip().lower() not in CHOICES:
        fail(f"--graphics {graphics}: expected one of {', '.join(CHOICES)}")
    kind, note = pick_graphics(graphics)
    if note:
        info(f"note: {note}")
    make_app(run_dir, poll=poll, graphics=kind).run()


# what `tarflow train` puts in a run directory (config.json comes first, events.jsonl next)
RUN_FILES = ("events.jsonl", "config.json", "checkpoints", "samples")


def not_a_run(path: Path) -> str | None:
    """Why `path` can never be watched (one sentence), or None: it is a run, or may become one.

    A path that does not exist yet, or an empty directory, may still become a run (the
    dashboard waits); a folder of runs (`runs/`), a directory holding other things and none of
    what `train` writes, or a path below a file, never will."""
    directory = path.parent if path.suffix == ".jsonl" and not path.is_dir() else path
    for above in (directory, *directory.parents):
        if above.exists():
            if not above.is_dir():
                return f"{path} cannot be a run directory: {above} is a file"
            break
    if not directory.is_dir():
        return None  # not there yet: the dashboard waits for it
    try:
        entries = sorted(directory.iterdir())
    except OSError as e:
        return f"cannot read {directory}: {e.strerror or e}"
    names = {e.name for e in entries}
    if names & set(RUN_FILES):
        return None
    runs = [e.name for e in entries if (e / "events.jsonl").is_file()]
    if runs:
        shown = ", ".join(runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
        newest = max(runs, key=lambda name: _mtime(directory / name / "events.jsonl"))
        return (
            f"{directory} is a folder of runs, not a run: watch one of them, "
            f"e.g. tarflow watch {directory / newest} (the newest; {len(runs)} there: {shown})"
        )
    if entries:
        return f"{directory} is not a run directory: it has no events.jsonl (nor config.json, checkpoints/ or samples/)"
    return None  # empty: a run may be about to start in it


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
