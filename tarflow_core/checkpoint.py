"""Checkpoints: the native self-describing format, and loading any `--ckpt` form.

Native checkpoint = a directory holding `model.safetensors` (+ `ema.safetensors` when EMA is on)
and `config.json` (architecture, data shape, noise, classes, training settings, step, version).
A run directory holds them under `checkpoints/step-XXXXXXXX/`. The published code's `.pth` state
dicts are read by `reference_checkpoint`; nothing ever unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from .atomic import _fsync_dir, default_mode
from .checkpoint_info import FORMAT, CheckpointError, CheckpointInfo, data_from_config, read_shapes, read_tensors
from .config import ModelConfig
from .model import TarFlow, state_shapes
from .reference_checkpoint import check_finite, read_reference_state, reference_info

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
RESUME_STATE_FILE = "train_state.pt"  # the resume state in a run's checkpoints (tarflow_core/train/state.py)


# ---------------------------------------------------------------------------------------- saving


def save_checkpoint(
    path: str | os.PathLike,
    model: TarFlow,
    *,
    noise: dict | None = None,
    step: int | None = None,
    data: dict | None = None,
    training: dict | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a native checkpoint directory atomically (a crash leaves any previous one intact)."""
    target = Path(path)
    info = CheckpointInfo(
        path=str(target),
        kind="native",
        config=model.config,
        noise=noise or {"type": None, "std": None},
        step=step,
        data=data or data_from_config(model.config),
        training=training or {},
        has_ema=ema_state is not None,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _write_tensors(tmp / MODEL_FILE, model.state_dict())
        if ema_state is not None:
            _write_tensors(tmp / EMA_FILE, ema_state)
        (tmp / CONFIG_FILE).write_text(json.dumps(info.to_dict(), indent=2) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, default_mode(directory=False))
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, default_mode(directory=True))
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata={"format": FORMAT})


# --------------------------------------------------------------------------------------- finding


class SavedCheckpoint(NamedTuple):
    step: int
    folder: Path  # `run/checkpoints/step-XXXXXXXX`


def list_checkpoints(run_dir: str | os.PathLike, extra_files: tuple[str, ...] = ()) -> list[SavedCheckpoint]:
    """Complete checkpoints under `run_dir/checkpoints/`, oldest first: each `step-N` folder
    holding the model and config files plus any `extra_files`."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    if folder.is_dir():
        for d in folder.iterdir():
            m = re.fullmatch(r"step-(\d+)", d.name)
            if m and all((d / f).is_file() for f in (MODEL_FILE, CONFIG_FILE, *extra_files)):
                found.append(SavedCheckpoint(int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `run_dir/checkpoints/`, or None."""
    found = list_checkpoints(run_dir)
    return found[-1].folder if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Any `--ckpt` form -> a native checkpoint directory or a `.pth` file."""
    p = Path(path)
    if not p.exists():
        newest = newest_run_named_like(p)
        hint = f"; the newest run whose name starts with {p.name} is {newest}" if newest else ""
        raise CheckpointError(f"checkpoint {p} does not exist{hint}")
    if p.is_file():
        native_file = p.name in (MODEL_FILE, EMA_FILE, CONFIG_FILE)
        if native_file or (p.name == RESUME_STATE_FILE and (p.parent / MODEL_FILE).exists()):
            return p.parent  # a file of a native checkpoint means that checkpoint
        return p
    if (p / MODEL_FILE).exists() or (p / CONFIG_FILE).exists() and not (p / CHECKPOINTS_DIR).is_dir():
        return p
    if p.name == CHECKPOINTS_DIR and not (p / CHECKPOINTS_DIR).is_dir():  # `run/checkpoints`: the run's newest
        p = p.parent
    if (p / CHECKPOINTS_DIR).is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"run directory {p} has no complete checkpoint in {CHECKPOINTS_DIR}/ yet")
        return latest
    # the published trainer's log folder holds `{dataset}_model_*.pth` (and `_opt_`) files: name them
    try:
        weights = sorted(f.name for f in p.iterdir() if f.suffix in (".pth", ".pt") and "_opt_" not in f.name)
    except OSError:
        weights = []
    hint = f"; it holds {', '.join(weights[:3])}{' ...' if len(weights) > 3 else ''}: give the file" if weights else ""
    raise CheckpointError(
        f"{p} is not a checkpoint: expected a run directory (with {CHECKPOINTS_DIR}/), a checkpoint "
        f"directory ({MODEL_FILE} + {CONFIG_FILE}) or a reference .pth file{hint}"
    )


def newest_run_named_like(path: Path) -> Path | None:
    """The most recently written run directory beside `path` whose name starts with its name
    (`runs/tiny` -> `runs/tiny-20261128-232751`: `train` names runs `<preset>-<time>`), or None."""
    try:
        found = [d for d in path.parent.iterdir() if d.name.startswith(path.name) and _is_run(d)]
    except OSError:
        return None
    return max(found, key=_last_written) if found and path.name else None


def _is_run(folder: Path) -> bool:
    return folder.is_dir() and ((folder / "events.jsonl").is_file() or (folder / CHECKPOINTS_DIR).is_dir())


def _last_written(run: Path) -> tuple[float, str]:
    """When a run last wrote its events (or its folder changed), the name breaking ties."""
    for f in (run / "events.jsonl", run):
        try:
            return f.stat().st_mtime, run.name
        except OSError:
            continue
    return 0.0, run.name


# --------------------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, patch_size: int | None = None, ema: bool = True
) -> tuple[TarFlow, CheckpointInfo]:
    """Build the model described by any `--ckpt` form and load its weights (EMA weights when present
    and `ema` is true). `patch_size` only matters for reference files whose name does not give it."""
    resolved = resolve_checkpoint(path)
    if resolved.is_dir():
        info = _native_info(resolved, patch_size)
        weights = resolved / (EMA_FILE if ema and info.has_ema and (resolved / EMA_FILE).exists() else MODEL_FILE)
        state = read_tensors(weights)
    else:
        state = read_reference_state(resolved)
        info = reference_info(state, resolved, patch_size=patch_size)
        check_finite(state, resolved)
    return _build(info.config, state, resolved).to(_target(device)).eval(), info


def _target(device: str | torch.device) -> torch.device:
    """The device to load onto (`auto` included); one that is not here is a ValueError naming it."""
    from .dist import DistError, resolve_device

    try:
        return resolve_device(device, option="device")
    except DistError as e:
        raise ValueError(str(e)) from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs) -> TarFlow:
    """`load_model(path)` for any `--ckpt` form: run dir, native checkpoint dir, or reference `.pth`."""
    return load_checkpoint(path, device, **kwargs)[0]


def read_info(path: str | os.PathLike, *, patch_size: int | None = None) -> CheckpointInfo:
    """Describe a checkpoint without building the model; its weight files' headers and tensor shapes
    are checked against the architecture described (what loading would refuse, refused here too)."""
    resolved = resolve_checkpoint(path)
    if resolved.is_dir():
        info = _native_info(resolved, patch_size)
        expected = state_shapes(info.config)
        for name in (MODEL_FILE, EMA_FILE) if info.has_ema and (resolved / EMA_FILE).exists() else (MODEL_FILE,):
            _check_state(expected, read_shapes(resolved / name), resolved / name)
        return info
    state = read_reference_state(resolved)
    info = reference_info(state, resolved, patch_size=patch_size)
    _check_state(state_shapes(info.config), {k: tuple(v.shape) for k, v in state.items()}, resolved)
    return info


def _native_info(folder: Path, patch_size: int | None) -> CheckpointInfo:
    """A native checkpoint's description; a patch size asked for must be the one it records."""
    info = read_native_info(folder)
    if patch_size is not None and patch_size != info.config.patch_size:
        raise CheckpointError(
            f"{folder} records patch size {info.config.patch_size}, not the {patch_size} asked for "
            "(the patch size is only needed for reference .pth files whose name does not give it)"
        )
    return info


def read_native_info(folder: Path) -> CheckpointInfo:
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {CONFIG_FILE}")
    if not (folder / MODEL_FILE).is_file():
        raise CheckpointError(f"checkpoint {folder} has no {MODEL_FILE}")
    try:
        raw = json.loads(cfg_path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"'format' is {raw.get('format')!r}, expected {FORMAT!r}")
        cfg = ModelConfig.from_dict(raw["model"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{cfg_path} is not a valid tarflow checkpoint config ({e})") from None
    return CheckpointInfo(
        path=str(folder),
        kind="native",
        config=cfg,
        noise=raw.get("noise") or {"type": None, "std": None},
        step=raw.get("step"),
        data=raw.get("data") or {},
        training=raw.get("training") or {},
        has_ema=bool(raw.get("ema")),
        tarflow_version=raw.get("tarflow_version"),
    )


def _build(cfg: ModelConfig, state: dict[str, torch.Tensor], source: Path) -> TarFlow:
    """The model of `cfg` holding the weights of `state` (as float32). Built on the meta device and
    given the loaded tensors, so there is no random initialisation to throw away (seconds for a
    published-size model) and no second copy of the weights in memory."""
    _check_state(state_shapes(cfg), {k: tuple(v.shape) for k, v in state.items()}, source)
    with torch.device("meta"):
        model = TarFlow(cfg)
    model.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in state.items()}, assign=True)
    return model


def _check_state(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], source: Path) -> None:
    """Refuse weights whose names or shapes (name -> shape) differ from the architecture's (`expected`)."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if tuple(shapes[k]) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
        raise CheckpointError(f"weights in {source} do not match the architecture ({'; '.join(parts)})")


# ------------------------------------------------------------------------------------ converting


def convert_reference(pth: str | os.PathLike, out_dir: str | os.PathLike, *, patch_size: int | None = None) -> Path:
    """Write a reference `.pth` as a native checkpoint directory computing the same function."""
    model, info = load_checkpoint(pth, patch_size=patch_size)
    return save_checkpoint(
        out_dir, model, noise=info.noise, step=info.step, data=info.data, training={"converted_from": Path(pth).name}
    )
