"""`tarflow train`: train a TarFlow model from a preset plus command-line overrides."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

from .common import limit_cpu_threads_when_busy
from .numbers import FINITE, train_seed_int
from tarflow_core.presets import PRESETS, ConfigError, TrainConfig, parse_noise, preset as get_preset

UI_CHOICES = ("tui", "rich", "plain")
# Settings that may change when a run is resumed (the rest would change the model or the data order).
# The learning rate and clipping may change too: the remedy when a run stopped on non-finite steps.
RESUME_CHANGEABLE = {
    "max_steps",
    "epochs",
    "log_every",
    "eval_every",
    "sample_every",
    "checkpoint_every",
    "keep_checkpoints",
    "num_samples",
    "eval_images",
    "max_bad_steps",
    "device",
    "workers",
    "compile",
    "precision",
    "lr",
    "min_lr",
    "grad_clip",
}

EXAMPLES = """
Examples:

  tarflow train                                   # the tiny CPU demo on the embedded digits

  tarflow train --preset mnist --data ./mnist --max-steps 20000

  tarflow train --preset imagenet64-cond --data /data/imagenet64 --batch-size 256 --ui plain

  tarflow train --resume runs/tiny-20250101-120000 --max-steps 5000

  torchrun --nproc_per_node=8 -m tarflow_cli train --preset imagenet64 --data /data/imagenet64
"""


def _opt(help: str, *names: str, **kw) -> Any:  # noqa: A002
    return typer.Option(*names, help=help, show_default=False, **kw)


def _num(help: str, *names: str) -> Any:  # noqa: A002
    """A float option: finite numbers only."""
    return _opt(help, *names, parser=FINITE)


def train(
    data: Annotated[
        Optional[str],
        _opt(
            "Training data: 'digits' (embedded), an image folder, .npz/.npy, MNIST IDX files or CIFAR batches.",
            "--data",
            "-d",
        ),
    ] = None,
    preset: Annotated[
        Optional[str],
        typer.Option(
            "--preset", "-p", help=f"Starting settings: {', '.join(PRESETS)} (default: tiny).", show_default=False
        ),
    ] = None,
    image_size: Annotated[
        Optional[int], _opt("Image size in pixels (default: read off the data).", "--image-size")
    ] = None,
    channels: Annotated[Optional[int], _opt("Channels, 1 or 3 (default: read off the data).", "--channels")] = None,
    flip: Annotated[Optional[bool], _opt("Random horizontal flips.", "--flip/--no-flip")] = None,
    patch_size: Annotated[Optional[int], _opt("Patch size p (tokens are p x p patches).", "--patch-size")] = None,
    width: Annotated[Optional[int], _opt("Transformer width.", "--width")] = None,
    blocks: Annotated[Optional[int], _opt("Number of flow blocks.", "--blocks")] = None,
    layers_per_block: Annotated[Optional[int], _opt("Transformer layers per flow block.", "--layers-per-block")] = None,
    head_dim: Annotated[Optional[int], _opt("Attention head size.", "--head-dim")] = None,
    expansion: Annotated[Optional[int], _opt("MLP hidden size as a multiple of the width.", "--expansion")] = None,
    nvp: Annotated[
        Optional[bool], _opt("Affine (--nvp) or shift-only volume-preserving (--vp) flow.", "--nvp/--vp")
    ] = None,
    conditional: Annotated[
        Optional[bool], _opt("Class conditioning (default: when the data has labels).", "--conditional/--unconditional")
    ] = None,
    label_drop: Annotated[
        Optional[float], _num("Fraction of labels dropped (conditional runs).", "--label-drop")
    ] = None,
    noise: Annotated[
        Optional[str], _opt("'uniform' (dequantization, likelihood runs) or 'gaussian:STD'.", "--noise")
    ] = None,
    batch_size: Annotated[
        Optional[int], _opt("Global batch size (per process x processes).", "--batch-size", "-b")
    ] = None,
    lr: Annotated[Optional[float], _num("Peak learning rate.", "--lr")] = None,
    min_lr: Annotated[
        Optional[float], _num("Learning rate at the start of warm-up and the end of the cosine.", "--min-lr")
    ] = None,
    warmup_steps: Annotated[Optional[int], _opt("Linear warm-up steps (default: one epoch).", "--warmup-steps")] = None,
    weight_decay: Annotated[Optional[float], _num("AdamW weight decay.", "--weight-decay")] = None,
    beta1: Annotated[Optional[float], _num("AdamW beta1.", "--beta1")] = None,
    beta2: Annotated[Optional[float], _num("AdamW beta2.", "--beta2")] = None,
    grad_clip: Annotated[Optional[float], _num("Clip the global gradient norm (0: off).", "--grad-clip")] = None,
    ema: Annotated[Optional[float], _num("EMA decay of the weights, e.g. 0.9999 (0: off).", "--ema")] = None,
    max_steps: Annotated[Optional[int], _opt("Run length in steps.", "--max-steps")] = None,
    epochs: Annotated[
        Optional[float], _num("Run length in epochs (used when --max-steps is not given).", "--epochs")
    ] = None,
    precision: Annotated[
        Optional[str], _opt("fp32, bf16 or auto (bf16 on CUDA for Gaussian-noise runs).", "--precision")
    ] = None,
    compile: Annotated[Optional[bool], _opt("torch.compile the model.", "--compile/--no-compile")] = None,  # noqa: A002
    sample_every: Annotated[Optional[int], _opt("Steps between sample grids (0: never).", "--sample-every")] = None,
    eval_every: Annotated[
        Optional[int], _opt("Steps between held-out bpd evaluations (0: never).", "--eval-every")
    ] = None,
    checkpoint_every: Annotated[
        Optional[int], _opt("Steps between checkpoints (0: only at the end).", "--checkpoint-every")
    ] = None,
    log_every: Annotated[
        Optional[int], _opt("Steps between training log lines (0: about 100 per run).", "--log-every")
    ] = None,
    keep_checkpoints: Annotated[
        Optional[int], _opt("Newest checkpoints kept (0: keep all).", "--keep-checkpoints")
    ] = None,
    max_bad_steps: Annotated[
        Optional[int], _opt("Consecutive non-finite steps before the run stops.", "--max-bad-steps")
    ] = None,
    num_samples: Annotated[Optional[int], _opt("Images in each sample grid.", "--num-samples")] = None,
    eval_images: Annotated[Optional[int], _opt("Held-out images per evaluation.", "--eval-images")] = None,
    workers: Annotated[Optional[int], _opt("Data loader worker processes.", "--workers")] = None,
    seed: Annotated[
        Optional[int], _opt("Random seed (model init, data order, noise).", "--seed", parser=train_seed_int)
    ] = None,
    device: Annotated[Optional[str], _opt("auto, cpu, cuda or cuda:N.", "--device")] = None,
    run_dir: Annotated[Optional[Path], _opt("Run directory (default: runs/<preset>-<time>).", "--run-dir")] = None,
    resume: Annotated[
        Optional[Path],
        _opt(
            "Continue the run in this directory exactly where it stopped, with its settings; only the run length, intervals, --lr, --min-lr, --grad-clip, --device, --workers, --precision and --compile may change.",
            "--resume",
        ),
    ] = None,
    ui: Annotated[
        Optional[str],
        _opt(
            "tui (the live dashboard), rich (a progress bar) or plain (log lines) (default: tui on an interactive terminal, else plain).",
            "--ui",
        ),
    ] = None,
) -> None:
    """Train a TarFlow model; prints the run directory on stdout when done.

    The run directory gets config.json, events.jsonl, checkpoints/ and samples/.
    Ctrl-C finishes the current step, saves a checkpoint and exits with code 130;
    --resume RUN_DIR continues it exactly.
    """
    try:  # a signal before the run's own handlers are in place (imports, settings) ends at once
        from tarflow_core.train import SetupError, TrainError, default_run_dir, load_run_config, stop_on_signals
        from tarflow_core.train import train as core_train

        is_main = int(os.environ.get("RANK", "0") or 0) == 0
        if (device or "auto").lower() == "cpu" or (
            (device or "auto").lower() == "auto" and not torch.cuda.is_available()
        ):
            limit_cpu_threads_when_busy()
        ui_mode = _pick_ui(ui)
        changes: dict[str, Any] = dict(
            data=data,
            image_size=image_size,
            channels=channels,
            flip=flip,
            patch_size=patch_size,
            width=width,
            blocks=blocks,
            layers_per_block=layers_per_block,
            head_dim=head_dim,
            expansion=expansion,
            nvp=nvp,
            conditional=conditional,
            beta1=beta1,
            beta2=beta2,
            keep_checkpoints=keep_checkpoints,
            max_bad_steps=max_bad_steps,
            label_drop=label_drop,
            batch_size=batch_size,
            lr=lr,
            min_lr=min_lr,
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            ema=ema,
            max_steps=max_steps,
            epochs=epochs,
            precision=precision.lower() if precision else None,
            compile=compile,
            sample_every=sample_every,
            eval_every=eval_every,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            num_samples=num_samples,
            eval_images=eval_images,
            workers=workers,
            seed=seed,
            device=device,
        )
        try:
            if noise is not None:
                kind, std = parse_noise(noise)
                changes["noise"] = kind
                if std is not None:
                    changes["noise_std"] = std
            given = {k: v for k, v in changes.items() if v is not None}
            if given.get("conditional") is False and given.get("label_drop"):
                raise ConfigError("--label-drop drops class labels, but --unconditional trains without any")
            if resume is not None:
                cfg = _resume_config(resume, run_dir, preset, given, load_run_config)
            else:
                cfg = _with_epochs(get_preset(preset or "tiny"), given).replace(**given)
                if run_dir is not None:
                    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
        except (ConfigError, SetupError) as e:
            _fail(str(e), 2)

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
                result = dashboard(cfg.run_dir, lambda stop: core_train(cfg, stop=stop, resume=resume is not None))
            else:
                view = _make_view(ui_mode) if is_main else None
                with stop_on_signals() as stop:
                    try:
                        result = core_train(
                            cfg, emit=view.handle if view else None, stop=stop, resume=resume is not None
                        )
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
            _fail(f"out of device memory at --batch-size {cfg.batch_size}; lower it (or the model size)", 1)
        except KeyboardInterrupt:
            if is_main:
                typer.echo("interrupted (aborted mid-step; the last checkpoint is kept)", err=True)
            raise typer.Exit(130) from None
        if is_main:
            if result.status == "failed":
                typer.echo(f"error: training failed: {result.reason}", err=True)
            elif result.status == "interrupted":
                typer.echo(
                    f"interrupted at step {result.step}; continue with: tarflow train --resume {result.run_dir}",
                    err=True,
                )
            with contextlib.suppress(OSError, ValueError):  # nobody is reading any more (`| head`)
                typer.echo(str(result.run_dir))
        if result.exit_code:
            raise typer.Exit(result.exit_code)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0") or 0) == 0:
            typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


train.__doc__ = inspect.cleandoc(train.__doc__ or "") + "\n" + EXAMPLES


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
        k
        for k, v in given.items()
        if k not in RESUME_CHANGEABLE
        and getattr(cfg, k) != v
        and not (k == "data" and _data_path(v) == _data_path(cfg.data))
    )
    if preset is not None and preset != cfg.preset:
        fixed.insert(0, "preset")
    if fixed:
        names = ", ".join("--" + k.replace("_", "-") for k in fixed)
        allowed = ", ".join("--" + k.replace("_", "-") for k in sorted(RESUME_CHANGEABLE))
        raise ConfigError(
            f"{names} cannot change when resuming {resume} (the run keeps its model, data and "
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


def _fmt(v: Any, spec: str = ".4g") -> str:
    if isinstance(v, (int, float)) and math.isfinite(v):
        return format(v, spec)
    return str(v)


def _describe(e: dict) -> str | None:
    """One human line for a non-train event (None: nothing to say)."""
    k, step = e["kind"], e["step"]
    if k == "start":
        d = e.get("data", {})
        resumed = f", resumed from step {step}" if e.get("resumed_from") else ""
        return (
            f"training {e.get('parameters', 0):,} parameters on {d.get('train', d.get('source'))} "
            f"({e.get('device')}, {e.get('precision')}, {e.get('world_size')} process(es), global batch "
            f"{e.get('global_batch')}, {e.get('total_steps')} steps{resumed}) -> {e.get('run_dir')}"
        )
    if k == "eval":
        return f"step {step}: held-out {_fmt(e.get('bpd'), '.4f')} bits/dim ({e.get('images')} images)"
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
    total = e.get("total_steps")
    return (
        f"step {e['step']}{'/' + str(total) if total else ''}  loss {_fmt(e.get('loss'))}  "
        f"bpd {_fmt(e.get('bpd'), '.4f')}  lr {_fmt(e.get('lr'), '.2e')}  grad {_fmt(e.get('grad_norm'), '.3g')}  "
        f"{_fmt(e.get('images_per_s'), '.0f')} img/s"
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
            stats = (
                f"loss {_fmt(e.get('loss'))} bpd {_fmt(e.get('bpd'), '.3f')} {_fmt(e.get('images_per_s'), '.0f')} img/s"
            )
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
