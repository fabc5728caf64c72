"""The resume state: everything beside the weights that a run needs to continue exactly, saved as
`train_state.pt` in each checkpoint of a run directory, and its restoring.

Exactness: the data order comes from (seed, epoch) and the augmentation noise from one generator
replicated on every rank, so restoring the optimizer, the loader's position and the generators'
states continues a run bit-exactly on CPU."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..atomic import atomic_path
from ..checkpoint import EMA_FILE, MODEL_FILE
from ..config import TrainConfig
from ..data import DataError
from ..dist import DistInfo
from ..ema import EMA
from ..model import TarFlow
from ..runtime import environment_changes
from .outcome import SetupError
from .run_dir import CONFIG_FILE, TRAIN_STATE_FILE, resumable_checkpoints
from .schedule import Schedule

STATE_FORMAT = "tarflow-train-state"
STATE_VERSION = 1
_NEEDED = ("step", "optimizer", "data", "rng")  # the rest has defaults (files of older versions)


@dataclass
class TrainState:
    """The contents of `train_state.pt` (a dict of these fields plus `format` and `version`)."""

    step: int
    optimizer: dict  # the AdamW state dict
    schedule: dict  # the run's `Schedule` as a dict: a resumed run tells a changed run length
    data: dict  # the loader's position
    rng: dict  # generator states: "noise" (augmentation), "torch" (CPU), "cuda" (or None)
    ema_updates: int = 0
    bad_steps: int = 0  # consecutive non-finite steps when saved
    world_size: int | None = None  # None: not recorded (taken as today's)

    @classmethod
    def capture(cls, step: int, optimizer, schedule: Schedule, loader, noise_gen, ema: EMA | None, **kw) -> TrainState:
        device = noise_gen.device
        rng = {
            "noise": noise_gen.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        schedule_dict = {f.name: getattr(schedule, f.name) for f in fields(schedule)}
        ema_updates = ema.updates if ema is not None else 0
        return cls(step, optimizer.state_dict(), schedule_dict, loader.state_dict(), rng, ema_updates, **kw)

    def save(self, path: Path) -> None:
        # a plain dict of tensors and numbers, so it loads with `weights_only=True`
        doc = {"format": STATE_FORMAT, "version": STATE_VERSION}
        doc.update((f.name, getattr(self, f.name)) for f in fields(self))
        with atomic_path(path) as tmp:
            torch.save(doc, tmp)

    @classmethod
    def load(cls, path: Path) -> TrainState:
        """Read with `weights_only=True` (no arbitrary unpickling). Raises whatever a damaged file
        raises, or ValueError for a file that is not a training state."""
        with warnings.catch_warnings():  # a foreign pickle's protocol warning says nothing useful here
            warnings.simplefilter("ignore")
            doc = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or any(k not in doc for k in _NEEDED):
            raise ValueError("not a tarflow training state")
        values = {f.name: doc[f.name] for f in fields(cls) if f.name in doc}
        values["schedule"] = doc.get("schedule") if isinstance(doc.get("schedule"), dict) else {}
        return cls(**values)


@dataclass
class Resumed:
    """What `resume` restored beside the objects it loaded into."""

    state: TrainState
    checkpoint: Path
    ema: EMA | None  # a fresh EMA when the checkpoint kept none
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (reason, message) for `warning` events


def resume(
    run_dir: Path,
    found: list[tuple[int, Path]],
    cfg: TrainConfig,
    *,
    model: TarFlow,
    optimizer: torch.optim.Optimizer,
    loader,
    noise_gen: torch.Generator,
    ema: EMA | None,
) -> Resumed:
    """Load the newest checkpoint in `found` into the run's objects. A damaged or mismatched file is
    a `SetupError` that names it and, when there is one, the way back to the previous checkpoint."""
    ckpt = found[-1][1]
    hint = f"; remove {ckpt} to resume from the checkpoint at step {found[-2][0]}" if len(found) > 1 else ""

    def damaged(name: str, e: BaseException) -> SetupError:
        why = (
            f"cannot be read ({e.strerror})"
            if isinstance(e, OSError) and e.strerror
            else "is damaged or not from a tarflow run"
        )
        return SetupError(f"cannot resume from {ckpt}: {name} {why}{hint}")

    try:
        state = TrainState.load(ckpt / TRAIN_STATE_FILE)
    except Exception as e:  # noqa: BLE001 - unpickling a damaged file raises many kinds
        raise damaged(TRAIN_STATE_FILE, e) from None
    tensors = _read_weights(ckpt, ema is not None, damaged)
    try:
        model.load_state_dict(tensors[MODEL_FILE])
    except RuntimeError:
        raise SetupError(
            f"cannot resume from {ckpt}: {MODEL_FILE} does not match the architecture in {run_dir / CONFIG_FILE}{hint}"
        ) from None
    try:
        loader.load_state_dict(state.data)
    except DataError as e:  # the data changed under the run (a folder that grew, another file)
        raise SetupError(f"{e} (--data {cfg.data}); resume with the data the run was trained on") from None
    except (KeyError, ValueError, TypeError) as e:
        raise damaged(TRAIN_STATE_FILE, e) from None
    try:
        optimizer.load_state_dict(state.optimizer)
        noise_gen.set_state(state.rng["noise"])
        torch.set_rng_state(state.rng["torch"])
        if noise_gen.device.type == "cuda" and state.rng.get("cuda") is not None:
            torch.cuda.set_rng_state(state.rng["cuda"], noise_gen.device)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        raise damaged(TRAIN_STATE_FILE, e) from None
    if ema is not None:
        if EMA_FILE in tensors:
            try:
                ema.load_state_dict(tensors[EMA_FILE], state.ema_updates)
            except (RuntimeError, KeyError, ValueError, TypeError) as e:
                raise damaged(EMA_FILE, e) from None
        else:
            ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)
    return Resumed(state, ckpt, ema)


def _read_weights(ckpt: Path, with_ema: bool, damaged) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    tensors = {}
    for name in (MODEL_FILE, EMA_FILE):
        if name == EMA_FILE and not (with_ema and (ckpt / EMA_FILE).is_file()):
            continue
        try:
            tensors[name] = load_file(str(ckpt / name))
        except (OSError, SafetensorError, ValueError, RuntimeError) as e:
            raise damaged(name, e) from None
    return tensors


def resume_warnings(
    resumed: Resumed, cfg: TrainConfig, d: DistInfo, steps_per_epoch: int, total_steps: int, env: dict | None = None
):
    """Why a resumed run will not continue exactly as the interrupted one would have: another number
    of processes, another run length, other optimisation settings, another thread count or
    environment (`env`, compared with the checkpoint's record). (reason, message) pairs."""
    state, step, notes = resumed.state, resumed.state.step, []
    saved_world = int(state.world_size if state.world_size is not None else d.world_size)
    if saved_world != d.world_size:
        notes.append(
            (
                "world_size",
                f"resumed with {d.world_size} process(es) where the run used {saved_world}: "
                "the data continue from the same global position, but per-process batches "
                "differ, so the weights will not match an uninterrupted run exactly",
            )
        )
    saved_total = state.schedule.get("total_steps")
    if saved_total is not None and int(saved_total) != total_steps:
        was = Schedule.for_run(cfg, steps_per_epoch, int(saved_total)).at(step)
        now = Schedule.for_run(cfg, steps_per_epoch, total_steps).at(step)
        notes.append(
            (
                "schedule",
                f"the run length changed from {int(saved_total)} to {total_steps} steps: the "
                f"learning-rate schedule is recomputed for the new length (lr {was:.3g} "
                f"-> {now:.3g} at step {step}), so the run does not continue exactly as it would have",
            )
        )
    saved = _saved_training(resumed.checkpoint)
    changed = _changed_settings(saved, cfg)
    if changed:
        notes.append(
            (
                "settings",
                f"resumed with changed optimisation settings ({', '.join(changed)}): the run does "
                "not continue exactly as it would have",
            )
        )
    notes += _runtime_notes(saved, cfg, env, step)
    return notes


def _saved_training(ckpt: Path) -> dict:
    """The `training` record of a checkpoint's config.json ({} when unreadable)."""
    try:
        saved: Any = json.loads((ckpt / CONFIG_FILE).read_text()).get("training") or {}
    except (OSError, ValueError, AttributeError):
        saved = {}
    return saved if isinstance(saved, dict) else {}


def _changed_settings(saved: dict, cfg: TrainConfig) -> list[str]:
    """The resume-changeable settings that change the numbers and differ from the checkpoint's, as `--lr A -> B`."""
    return [
        f"--{k.replace('_', '-')} {saved[k]} -> {getattr(cfg, k)}"
        for k in ("lr", "min_lr", "grad_clip", "micro_batch")  # another micro-batch reorders the gradient sums
        if k in saved and saved[k] != getattr(cfg, k)
    ]


def recorded_threads(run_dir: str | Path | None) -> int | None:
    """The CPU threads the newest resumable checkpoint of `run_dir` was computed with (None: not
    recorded, as in runs of older versions)."""
    found = resumable_checkpoints(run_dir) if run_dir else []
    env = _saved_training(found[-1][1]).get("environment") if found else None
    threads = env.get("threads") if isinstance(env, dict) else None
    return threads if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1 else None


def _runtime_notes(saved: dict, cfg: TrainConfig, env: dict | None, step: int) -> list[tuple[str, str]]:
    """Another --threads than the checkpoint was computed with (the reduction order changes), then
    any other difference in the recorded environment (torch, device, precision, deterministic mode)."""
    notes = []
    saved_env = saved.get("environment") if isinstance(saved.get("environment"), dict) else {}
    was = saved_env.get("threads")
    if was is not None and cfg.threads is not None and was != cfg.threads:
        notes.append(
            (
                "threads",
                f"resumed with --threads {cfg.threads} where the run used {was}: floating-point sums are "
                f"ordered differently, so the run does not continue exactly from step {step} on",
            )
        )
    changes = environment_changes(saved_env, env, ("threads",) if notes else ()) if env is not None else []
    if changes:
        notes.append(
            (
                "environment",
                f"the environment differs from the one that saved the checkpoint at step {step} "
                f"({', '.join(changes)}): the run may not continue bit-exactly",
            )
        )
    return notes
