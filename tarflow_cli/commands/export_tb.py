"""`tarflow export-tb RUN_DIR`: a run's scalars and sample grids as TensorBoard files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import EXIT_USAGE, fail, info, out, to_stdout, user_errors
from .watch import not_a_run


def export_tb(
    run_dir: Annotated[
        Path,
        typer.Argument(
            metavar="RUN_DIR",
            help="The run directory (or its events.jsonl). With --follow it may not exist yet.",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            metavar="DIR",
            help="Folder for the TensorBoard files; those an earlier export or train --tensorboard wrote "
            "there are replaced \\[default: RUN_DIR/tensorboard/].",
            show_default=False,
        ),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", metavar="", help="Keep following a live run until it ends (Ctrl-C stops earlier)."
        ),
    ] = False,
) -> None:
    """Write a run's metrics and sample grids as TensorBoard files, from its events.jsonl.

    Scalars: train/loss, train/bpd, eval/bpd (held-out; a variational run's bound, with
    eval/bpd_uniform beside it), train/lr, train/grad_norm, speed/images_per_s, speed/tflops (and
    nll, logdet, epoch, memory); images: the sample grids.
    The events file stays the run's record: exporting again rewrites the TensorBoard files from it.
    Prints the output folder on stdout. Needs the tensorboard package: pip install 'tarflow\\[tensorboard]'.

    Examples:

      tarflow export-tb runs/tiny-20250101-120000 && tensorboard --logdir runs

      tarflow export-tb runs/demo --follow --out tb/demo
    """
    source, events = _run_paths(run_dir)
    if not follow and not events.is_file():
        fail(f"{run_dir} has no events.jsonl yet (to wait for a run that is starting, add --follow)")
    from tarflow_core.tensorboard import TENSORBOARD_DIR, TensorBoardMissing, export, require_tensorboard

    try:
        require_tensorboard()
    except TensorBoardMissing as e:
        fail(str(e), EXIT_USAGE)
    target = out_dir if out_dir is not None else source / TENSORBOARD_DIR
    with user_errors():
        if follow:
            info(f"following {events} into {target} until the run ends (Ctrl-C stops)")
        try:
            counts = export(events, target, follow=follow)
        except OSError as e:
            fail(f"cannot write {target}: {e.strerror or e}")
    _report(counts, target)


def _run_paths(run_dir: Path) -> tuple[Path, Path]:
    """(run directory, events file), refusing at once what can never be a run."""
    if run_dir.exists() and not run_dir.is_dir() and run_dir.suffix != ".jsonl":
        fail(f"{run_dir} is a file; expected a run directory or its events.jsonl")
    why = not_a_run(run_dir)
    if why:
        fail(why.replace("tarflow watch", "tarflow export-tb"))
    if run_dir.suffix == ".jsonl" and not run_dir.is_dir():
        return run_dir.parent, run_dir
    return run_dir, run_dir / "events.jsonl"


def _report(counts, target: Path) -> None:
    grids = f", {counts.images} sample grid(s)" if counts.images else ""
    info(f"wrote {counts.scalars} scalar point(s){grids} to {target}; view with: tensorboard --logdir {target}")
    if counts.missing_grids:
        shown = ", ".join(counts.missing_grids[:3]) + (" ..." if len(counts.missing_grids) > 3 else "")
        info(f"note: {len(counts.missing_grids)} sample grid(s) named by the events were not found: {shown}")
    with to_stdout():
        out.print(str(target))
