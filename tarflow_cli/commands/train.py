"""`tarflow train`: train a TarFlow model from a preset plus command-line overrides.

The options that set the run (`--lr`, `--blocks`, ...) are not written here: each is built from
its `TrainConfig` field's declaration in tarflow_core/config.py (flags, help, default "not
given"). Only the options that are no setting of their own are declared below: `--preset` (the
starting settings), `--noise` (sets the `noise` and `noise_std` fields), `--resume`, `--ui` and the
memory plan's `--plan`, `--memory` and `--json` (`train_plan.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from tarflow_core.config import RESUME_CHANGEABLE, ConfigError, TrainConfig, flag, option_spec, parse_noise
from tarflow_core.presets import PRESETS
from tarflow_core.presets import preset as get_preset

from ..options import FLAG
from .numbers import FINITE, layer_counts, micro_batch_int, train_seed_int
from .train_help import bracket_default, preset_default

UI_CHOICES = ("tui", "rich", "plain")

EXAMPLES = """
Examples:

  tarflow train                    # the tiny CPU demo on the embedded digits

  tarflow train --preset mnist --data ./mnist --max-steps 20000

  tarflow train --preset imagenet64-cond --data /data/imagenet64 \\
    --batch-size 256 --ui plain

  tarflow train --resume runs/tiny-20250101-120000 --max-steps 5000

  torchrun --nproc_per_node=8 -m tarflow_cli train --preset imagenet64 \\
    --data /data/imagenet64
"""

# The options of `tarflow train` that are no `TrainConfig` field (run control: resume, the view, the
# memory plan), and the fields that have no option of their own (`--noise gaussian:STD` sets
# `noise_std`). Every other field is exactly one option (tests/cli/test_train_cli.py checks it): most are
# built from the field's declaration, while `--preset` (it picks the preset whose name the field keeps)
# and `--noise` are written below.
OPTIONS_WITHOUT_FIELD = ("resume", "ui", "plan", "memory", "json")
FIELDS_WITHOUT_OPTION = ("noise_std",)


def _opt(help: str, *names: str, **kw) -> Any:  # noqa: A002
    return typer.Option(*names, help=bracket_default(help), show_default=False, **kw)


# Parsers beyond the field's type: a float option takes finite numbers only (see `_field_option`);
# training derives per-rank and per-stream seeds by adding small offsets, so its seed keeps well inside
# torch's range; --micro-batch also takes `auto`; a tuple field is one comma-separated value (--block-layers).
PARSERS = {"seed": train_seed_int, "micro_batch": micro_batch_int, "block_layers": layer_counts}


def _written_options() -> dict[str, tuple[Any, Any]]:
    """name -> (type, typer.Option) of the options that are not built from a field's declaration."""
    noise = next(f for f in dataclasses.fields(TrainConfig) if f.name == "noise")
    return {
        "preset": (Optional[str], _opt(f"Starting settings: {', '.join(PRESETS)} (default: tiny).", "--preset", "-p")),
        "noise": (Optional[str], _opt(option_spec(noise).help, "--noise")),
        "resume": (
            Optional[Path],
            _opt(
                "Continue the run in this directory exactly where it stopped, with its settings; only the run "
                "length, intervals, --lr, --min-lr, --grad-clip, --device, --workers, --threads, --precision, "
                "--compile, --micro-batch and --checkpointing may change.",
                "--resume",
            ),
        ),
        "ui": (
            Optional[str],
            _opt(
                "tui (the live dashboard), rich (a progress bar) or plain (log lines) (default: tui on an "
                "interactive terminal, else plain).",
                "--ui",
            ),
        ),
        "plan": (
            Optional[bool],
            _opt(
                "Print the memory plan of these settings (parameters, FLOPs/image, peak per process, largest "
                "fitting micro-batch, accumulation, time per step) and exit; no training.",
                "--plan",
                metavar=FLAG,
            ),
        ),
        "memory": (
            Optional[str],
            _opt("With --plan: memory per process, e.g. 80GiB (default: the CUDA device's).", "--memory"),
        ),
        "json": (Optional[bool], _opt("With --plan: print the plan as one JSON object.", "--json", metavar=FLAG)),
    }


def _field_option(f: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    """(type, typer.Option) of a `TrainConfig` field: its declared flags and help; None = not given."""
    spec = option_spec(f)
    kind = Path if spec.path else next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    parser = PARSERS.get(f.name, FINITE if kind is float else None)
    help = bracket_default(spec.help, preset_default(f.name, spec.flags))  # noqa: A001
    extra = {"parser": parser} if parser else {"metavar": FLAG} if kind is bool else {}
    if typing.get_origin(kind) is tuple:  # one text its parser splits, not typer's several values per option
        kind, extra["metavar"] = str, f"<{typing.get_args(kind)[0].__name__},...>"
    return Optional[kind], _opt(help, *spec.flags, **extra)


def _options() -> list[inspect.Parameter]:
    """The command's parameters in `TrainConfig`'s field order, then `--resume` and `--ui`."""
    written, hints = _written_options(), typing.get_type_hints(TrainConfig)
    params = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in written:
            params.append((f.name, *written[f.name]))
        elif option_spec(f).cli:
            params.append((f.name, *_field_option(f, hints[f.name])))
    params += [(name, *written[name]) for name in OPTIONS_WITHOUT_FIELD]
    kw = inspect.Parameter.KEYWORD_ONLY
    return [inspect.Parameter(n, kw, default=None, annotation=Annotated[t, o]) for n, t, o in params]


def _takes_options(command):
    """Give `command(**options)` the parameters typer reads its options from."""
    params = _options()
    command.__signature__ = inspect.Signature(params, return_annotation=None)
    command.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return command


@_takes_options
def train(**options: Any) -> None:
    """Train a TarFlow model; prints the run directory on stdout when done.

    The run directory gets config.json, events.jsonl, checkpoints/ and samples/.
    Ctrl-C finishes the current step, saves a checkpoint and exits with code 130;
    --resume RUN_DIR continues it exactly.
    """
    try:  # a signal before the run's own handlers are in place (imports, settings) ends at once
        is_main = int(os.environ.get("RANK", "0") or 0) == 0
        plan, memory, as_json = options.pop("plan"), options.pop("memory"), options.pop("json")
        if not plan and (memory is not None or as_json):
            _fail(f"{'--memory' if memory is not None else '--json'} goes with --plan", 2)
        ui_mode = _pick_ui(options.pop("ui"))
        resume = options.pop("resume")
        cfg = _settings(options, resume)
        if plan:
            from .train_plan import print_plan

            return print_plan(cfg, memory, bool(as_json), _fail)
        result = _run(cfg, ui_mode, resume is not None, is_main)
        if is_main:
            _report(result)
        if result.exit_code:
            raise typer.Exit(result.exit_code)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0") or 0) == 0:
            typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


train.__doc__ = inspect.cleandoc(train.__doc__ or "") + "\n" + EXAMPLES


def _settings(options: dict[str, Any], resume: Path | None) -> TrainConfig:
    """The run's settings: a preset (or, with --resume, the run's own) with the options given."""
    from tarflow_core.train import SetupError, load_run_config

    preset, noise, run_dir = options.pop("preset"), options.pop("noise"), options.pop("run_dir")
    options["precision"] = (options["precision"] or "").lower() or None  # --precision BF16 is bf16
    given = {k: v for k, v in options.items() if v is not None}
    try:
        if noise is not None:
            kind, std = parse_noise(noise)
            given["noise"] = kind
            if std is not None:
                given["noise_std"] = std
        if given.get("conditional") is False and given.get("label_drop"):
            raise ConfigError("--label-drop drops class labels, but --unconditional trains without any")
        if resume is not None:
            return _resume_config(resume, run_dir, preset, given, load_run_config)
        cfg = _with_epochs(get_preset(preset or "tiny"), given).replace(**given)
        return dataclasses.replace(cfg, run_dir=str(run_dir)) if run_dir is not None else cfg
    except (ConfigError, SetupError) as e:
        _fail(str(e), 2)


def _run(cfg: TrainConfig, ui_mode: str, resume: bool, is_main: bool):
    """Train with the chosen view (the dashboard, a progress bar or log lines); the run's result."""
    from tarflow_core.train import SetupError, TrainError, default_run_dir, stop_on_signals
    from tarflow_core.train import train as core_train

    dashboard = note = None
    if ui_mode == "tui":
        dashboard, note = _dashboard()
        if dashboard is None:
            ui_mode = "rich"
    if note and is_main:
        typer.echo(note, err=True)
    try:
        if dashboard is not None:
            if cfg.run_dir is None:  # the dashboard follows the run directory's events.jsonl
                cfg = dataclasses.replace(cfg, run_dir=str(default_run_dir(cfg)))
            return dashboard(cfg.run_dir, lambda stop: core_train(cfg, stop=stop, resume=resume))
        view = _make_view(ui_mode) if is_main else None
        with stop_on_signals() as stop:
            try:
                return core_train(cfg, emit=view.handle if view else None, stop=stop, resume=resume)
            finally:
                if view is not None:
                    view.close()
    except SetupError as e:
        _fail(str(e), 2)
    except TrainError as e:
        _fail(str(e), 1)
    except MemoryError:
        _fail("out of memory; lower --batch-size (or the model size)", 1)
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        _fail(
            f"out of device memory at --batch-size {cfg.batch_size}; lower --micro-batch (or --batch-size, or the "
            "model size) or use --checkpointing blocks (tarflow train --plan shows what fits)",
            1,
        )
    except KeyboardInterrupt:
        if is_main:
            typer.echo("interrupted (aborted mid-step; the last checkpoint is kept)", err=True)
        raise typer.Exit(130) from None


def _report(result) -> None:
    if result.status == "failed":
        typer.echo(f"error: training failed: {result.reason}", err=True)
    elif result.status == "interrupted":
        typer.echo(
            f"interrupted at step {result.step}; continue with: tarflow train --resume {result.run_dir}", err=True
        )
    with contextlib.suppress(OSError, ValueError):  # nobody is reading any more (`| head`)
        typer.echo(str(result.run_dir))


def _fail(message: str, code: int) -> None:
    if int(os.environ.get("RANK", "0") or 0) == 0:
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _pick_ui(ui: str | None) -> str:
    if ui is None:  # the dashboard on an interactive terminal, plain log lines for scripts and logs
        interactive = all(s is not None and s.isatty() for s in (sys.stdin, sys.stdout, sys.stderr))
        single = int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1
        if interactive and single:
            return "tui"
        return "rich" if sys.stderr.isatty() else "plain"
    u = ui.strip().lower()
    if u not in UI_CHOICES:
        _fail(f"--ui {ui}: expected tui, rich or plain", 2)
    return u


def _dashboard():
    """The Textual dashboard runner, when it can be used here; else (None, note)."""
    instead = "showing a progress bar" if sys.stderr.isatty() else "writing log lines"
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return None, f"note: the dashboard (--ui tui) runs only in single-process training; {instead}"
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        return None, f"note: the dashboard (--ui tui) needs an interactive terminal; {instead}"
    try:
        from ..tui.training import run_training_dashboard
    except ImportError:
        return None, f"note: the terminal dashboard (--ui tui) is not available; {instead}"
    return run_training_dashboard, None


def _resume_config(
    resume: Path, run_dir: Path | None, preset: str | None, given: dict[str, Any], load_run_config
) -> TrainConfig:
    if run_dir is not None and Path(run_dir).resolve() != Path(resume).resolve():
        raise ConfigError(f"--run-dir {run_dir} differs from --resume {resume}; a resumed run stays in its directory")
    if not Path(resume).is_dir():
        raise ConfigError(f"--resume {resume}: no such run directory")
    cfg = load_run_config(resume)
    fixed = sorted(
        flag(k)
        for k, v in given.items()
        if k not in RESUME_CHANGEABLE
        and getattr(cfg, k) != v
        and not (k == "data" and _data_path(v) == _data_path(cfg.data))
    )
    if preset is not None and preset != cfg.preset:
        fixed.insert(0, "--preset")
    if fixed:
        allowed = ", ".join(sorted(flag(k) for k in RESUME_CHANGEABLE))
        raise ConfigError(
            f"{', '.join(fixed)} cannot change when resuming {resume} (the run keeps its model, data and "
            f"optimisation settings); what may change: {allowed}"
        )
    return dataclasses.replace(_with_epochs(cfg, given).replace(**given), run_dir=str(resume))


def _data_path(data: str | None) -> str | None:
    """A data source as the run stores it: the embedded name, or an absolute path."""
    return data if data in (None, "digits") else str(Path(data).expanduser().resolve())


def _with_epochs(cfg: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """--epochs without --max-steps: the run length comes from the epochs."""
    if "epochs" in given and "max_steps" in given:
        raise ConfigError("--max-steps and --epochs both set the run length; give one of them")
    if "epochs" in given and "max_steps" not in given:
        return dataclasses.replace(cfg, max_steps=None, epochs=given["epochs"])
    return cfg


# ---------------------------------------------------------------------------------- views


def _fmt(v: Any, spec: str = ".4g", width: int = 0) -> str:
    """`v` in `spec`, right-aligned in `width` columns (nan and missing values too)."""
    text = format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else str(v)
    return text.rjust(width)


def _describe(e: dict) -> str | None:
    """One human line for a non-train event (None: nothing to say)."""
    k, step = e["kind"], e["step"]
    if k == "start":
        d = e.get("data", {})
        resumed = f", resumed from step {step}" if e.get("resumed_from") else ""
        accumulation = e.get("accumulation") or 1
        split = f" in {accumulation} micro-batches of {e.get('micro_batch')}" if accumulation > 1 else ""
        note = f"; {e['micro_batch_note']}" if e.get("micro_batch_note") else ""
        return (
            f"training {e.get('parameters', 0):,} parameters on {d.get('train', d.get('source'))} "
            f"({e.get('device')}, {e.get('precision')}, {e.get('world_size')} process(es), global batch "
            f"{e.get('global_batch')}{split}, {e.get('total_steps')} steps{resumed}) -> {e.get('run_dir')}{note}"
        )
    if k == "eval":
        bound = ""
        if e.get("dequant") == "variational":  # which bound `bpd` is; runs without q have no such field
            bound = f" (variational bound; uniform dequantization {_fmt(e.get('bpd_uniform'), '.4f')})"
        return f"step {step}: held-out {_fmt(e.get('bpd'), '.4f')} bits/dim{bound} ({e.get('images')} images)"
    if k == "sample":
        return f"step {step}: samples {e.get('path')}"
    if k == "checkpoint":
        return f"step {step}: checkpoint {e.get('path')}"
    if k == "warning":
        return f"warning (step {step}): {e.get('message')}"
    if k == "end":
        return f"step {step}: {e.get('status')} ({e.get('reason')})"
    return None


def _train_line(e: dict) -> str:
    """One log line whose columns keep their width from line to line (fixed decimals, padded)."""
    total = e.get("total_steps")
    step = f"{e['step']:>{len(str(total))}}/{total}" if total else str(e["step"])
    return (
        f"step {step}  loss {_fmt(e.get('loss'), '.4f', 7)}  bpd {_fmt(e.get('bpd'), '.4f', 6)}  "
        f"lr {_fmt(e.get('lr'), '.2e', 8)}  grad {_fmt(e.get('grad_norm'), '.2f', 5)}  "
        f"{_fmt(e.get('images_per_s'), '.0f', 4)} img/s"
    )


class _PlainView:
    """One line per event on stderr. A reader that goes away (`tarflow train ... 2>&1 | head`) ends
    the lines, not the run: the events file still has everything."""

    def __init__(self) -> None:
        self.gone = False

    def handle(self, e: dict) -> None:
        line = _train_line(e) if e["kind"] == "train" else _describe(e)
        if line and not self.gone:
            try:
                typer.echo(line, err=True)
            except (OSError, ValueError):  # BrokenPipeError, a closed stream
                self.gone = True

    def close(self) -> None:
        pass


class _RichView:
    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True, highlight=False)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
            transient=False,
        )
        self.task = None

    def handle(self, e: dict) -> None:
        kind = e["kind"]
        if kind == "start":
            self.progress.start()
            self.task = self.progress.add_task("train", total=e.get("total_steps"), completed=e["step"], stats="")
        if kind == "train" and self.task is not None:
            speed = _fmt(e.get("images_per_s"), ".0f")
            stats = f"loss {_fmt(e.get('loss'), '.4f', 7)} bpd {_fmt(e.get('bpd'), '.3f')} {speed} img/s"
            self.progress.update(self.task, completed=e["step"], stats=stats)
            return
        line = _describe(e)
        if line:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        self.progress.stop()


def _make_view(mode: str):
    """A Rich bar redraws in place, which a file or pipe cannot show (it would get nothing but the
    last frame): there `--ui rich` writes the plain log lines."""
    return _RichView() if mode == "rich" and sys.stderr.isatty() else _PlainView()
