"""Checkpoints: the native self-describing format and the published code's `.pth` state dicts.

Native checkpoint = a directory holding `model.safetensors` (+ `ema.safetensors` when EMA is on)
and `config.json` (architecture, data shape, noise, classes, training settings, step, version).
A run directory holds them under `checkpoints/step-XXXXXXXX/`. Nothing here ever unpickles
arbitrary objects: reference files are read with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic import _fsync_dir, default_mode
from .config import ModelConfig, guess_channels_and_patch
from .load_errors import describe, file_head, not_torch
from .model import TarFlow, state_shapes

FORMAT = "tarflow-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
RESUME_STATE_FILE = "train_state.pt"  # the resume state in a run's checkpoints (tarflow_core/train/state.py)
# the published trainer's `{dataset}_model_{patch}_{width}_{blocks}_{layers}_{noise}.pth`, also as the
# copies downloads make of it: `... (1).pth`, `...-1.pth` (browsers) and `.pth.1` (wget)
REFERENCE_NAME = re.compile(
    r"^(?:(?P<dataset>.+?)_)?model_(?P<patch>\d+)_(?P<width>\d+)_(?P<blocks>\d+)_(?P<layers>\d+)"
    r"_(?P<noise>uniform|\d+(?:\.\d+)?|\.\d+)(?: ?\(\d+\)|-\d+)?(?:\.[A-Za-z]\w*)?(?:\.\d+)?$"
)
REFERENCE_HEAD_DIM = 64


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used; the message names it and says what was expected."""


@dataclass
class CheckpointInfo:
    path: str
    kind: str  # "native" or "reference"
    config: ModelConfig
    noise: dict[str, Any] = field(default_factory=lambda: {"type": None, "std": None})
    step: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    has_ema: bool = False
    tarflow_version: str | None = None

    @property
    def noise_std(self) -> float | None:
        return self.noise.get("std") if self.noise.get("type") == "gaussian" else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tarflow_version": self.tarflow_version or __version__,
            "model": self.config.to_dict(),
            "data": self.data,
            "noise": self.noise,
            "step": self.step,
            "training": self.training,
            "ema": self.has_ema,
        }


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
        str(target),
        "native",
        model.config,
        noise or {"type": None, "std": None},
        step,
        data or _data_from_config(model.config),
        training or {},
        ema_state is not None,
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


def _data_from_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"channels": cfg.in_channels, "image_size": cfg.img_size, "num_classes": cfg.num_classes}


# --------------------------------------------------------------------------------------- finding


def list_checkpoints(run_dir: str | os.PathLike, extra_files: tuple[str, ...] = ()) -> list[tuple[int, Path]]:
    """Complete checkpoints under `run_dir/checkpoints/` as (step, folder), oldest first: each
    `step-N` folder holding the model and config files plus any `extra_files`."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    if folder.is_dir():
        for d in folder.iterdir():
            m = re.fullmatch(r"step-(\d+)", d.name)
            if m and all((d / f).is_file() for f in (MODEL_FILE, CONFIG_FILE, *extra_files)):
                found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `run_dir/checkpoints/`, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Any `--ckpt` form -> a native checkpoint directory or a `.pth` file."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
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
        state = _read_tensors(weights)
    else:
        state = read_reference_state(resolved)
        info = reference_info(state, resolved, patch_size=patch_size)
        _check_finite(state, resolved)
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
    """Describe a checkpoint without building the model."""
    resolved = resolve_checkpoint(path)
    if resolved.is_dir():
        return _native_info(resolved, patch_size)
    state = read_reference_state(resolved)
    info = reference_info(state, resolved, patch_size=patch_size)
    _check_state(state_shapes(info.config), state, resolved)
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
        str(folder),
        "native",
        cfg,
        raw.get("noise") or {"type": None, "std": None},
        raw.get("step"),
        raw.get("data") or {},
        raw.get("training") or {},
        bool(raw.get("ema")),
        raw.get("tarflow_version"),
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def _build(cfg: ModelConfig, state: dict[str, torch.Tensor], source: Path) -> TarFlow:
    """The model of `cfg` holding the weights of `state` (as float32). Built on the meta device and
    given the loaded tensors, so there is no random initialisation to throw away (seconds for a
    published-size model) and no second copy of the weights in memory."""
    _check_state(state_shapes(cfg), state, source)
    with torch.device("meta"):
        model = TarFlow(cfg)
    model.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in state.items()}, assign=True)
    return model


def _check_finite(state: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse a reference file whose weights went non-finite: the published trainer saves every epoch,
    also after its loss went to NaN (tarflow's own trainer skips such steps, so native checkpoints
    are clean unless edited, and then load and score as null with a warning)."""
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(
            f"weights in {source} hold NaN or infinite values ({', '.join(broken[:3])}"
            f"{' ...' if len(broken) > 3 else ''}): the training diverged before they were saved"
        )
    if "var" in state and not bool((state["var"] > 0).all()):
        raise CheckpointError(f"{source}: the prior variance 'var' holds values <= 0 (expected positive variances)")


def _check_state(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse weights whose names or shapes (`expected`: name -> shape) differ from the architecture's."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
        raise CheckpointError(f"weights in {source} do not match the architecture ({'; '.join(parts)})")


# ----------------------------------------------------------------------------- reference `.pth`

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_reference_state(path: Path) -> dict[str, torch.Tensor]:
    """A published-code `.pth` (or the same state dict saved as `.safetensors`, as model hubs hold
    them) as a dict of tensors; refuses anything but plain tensors."""
    head = file_head(path, 9)
    if head is not None and len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        obj = _read_tensors(path)  # a safetensors header: an 8-byte length, then JSON
        return _strip_state(obj, path)
    problem = not_torch(head)
    if problem:
        raise CheckpointError(f"{path}: {problem}; expected a PyTorch state dict (.pth)")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower() or "unsupported class" in str(e).lower():
            # torch refused to import a Python object the file names: nothing was run
            raise CheckpointError(
                f"{path} holds pickled Python objects, not a plain tensor state dict; refusing to load it "
                "(unpickling could run code)"
            ) from None
        raise CheckpointError(f"{path} is not a readable PyTorch state dict (not a torch.save file)") from None
    except Exception as e:  # corrupt zip, truncated file, not a torch file at all
        raise CheckpointError(f"{path} is not a readable PyTorch state dict ({describe(e)})") from None
    return _strip_state(_unwrap(obj, path), path)


def _strip_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Tensor names without DDP/compile wrapper prefixes, less the causal masks."""
    if not _is_state_dict(obj):
        raise CheckpointError(f"{path} is not a TarFlow state dict (expected a dict of tensors)")
    state = {}
    for k, v in obj.items():
        while k.startswith(WRAPPER_PREFIXES):  # DDP and torch.compile wrappers, nested in any order
            k = k.split(".", 1)[1]
        if not k.endswith(".attn_mask"):  # the causal mask is recomputed, never trusted
            state[k] = v
    return state


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, path: Path) -> Any:
    """The state dict inside `{"model": state_dict, "epoch": ..., ...}` wrappers (one dict of tensors
    among the entries); the published trainer's optimizer file is named as such."""
    if not isinstance(obj, dict) or _is_state_dict(obj):
        return obj
    if "optimizer" in obj and "lr_schedule" in obj:
        model_file = path.name.replace("_opt_", "_model_") if "_opt_" in path.name else "{dataset}_model_....pth"
        raise CheckpointError(
            f"{path} holds the published trainer's optimizer state, not model weights; "
            f"give its model file ({model_file})"
        )
    inner = {k: v for k, v in obj.items() if _is_state_dict(v)}
    flows = {k: v for k, v in inner.items() if any(str(n).endswith("proj_in.weight") for n in v)}
    found = flows or inner
    if len(found) == 1:
        return next(iter(found.values()))
    if len(found) > 1:
        raise CheckpointError(
            f"{path} holds several state dicts ({', '.join(map(str, found))}); "
            "expected one (save the one to use on its own)"
        )
    return obj


def reference_info(state: dict[str, torch.Tensor], path: Path, *, patch_size: int | None = None) -> CheckpointInfo:
    """Read the architecture off tensor shapes and the reference file name."""

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"{path} is not a TarFlow state dict (no tensor {key!r})")
        return state[key]

    width, token_dim = need("blocks.0.proj_in.weight").shape
    tokens = need("blocks.0.pos_embed").shape[0]
    need("var")
    blocks = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    layers = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.0\.attn_blocks\.(\d+)\.", k))})
    hidden = need("blocks.0.attn_blocks.0.mlp.main.0.weight").shape[0]
    out_dim = need("blocks.0.proj_out.weight").shape[0]
    num_classes = state["blocks.0.class_embed"].shape[0] if "blocks.0.class_embed" in state else 0

    name = REFERENCE_NAME.match(path.name)
    noise: dict[str, Any] = {"type": None, "std": None}
    data: dict[str, Any] = {}
    if name:
        if name["noise"] == "uniform":
            noise = {"type": "uniform", "std": None}
        elif float(name["noise"]) > 0:  # the published scripts write std 0 when no noise was added
            noise = {"type": "gaussian", "std": float(name["noise"])}
        if patch_size is None:
            patch_size = int(name["patch"])
        elif patch_size != int(name["patch"]):  # another patch size would silently change the image shape
            raise CheckpointError(
                f"{path.name}: its name gives patch size {name['patch']}, not the {patch_size} asked for "
                "(the patch size is only needed for files whose name does not give it)"
            )
        if name["dataset"]:
            data["source"] = name["dataset"]
        if (int(name["width"]), int(name["blocks"]), int(name["layers"])) != (width, blocks, layers):
            raise CheckpointError(
                f"{path.name} names width {name['width']}, {_count(int(name['blocks']), 'block')}, "
                f"{_count(int(name['layers']), 'layer')} per block but its tensors hold width {width}, "
                f"{_count(blocks, 'block')}, {_count(layers, 'layer')} per block"
            )
    if patch_size is not None:
        if patch_size < 1:
            raise CheckpointError(f"patch size {patch_size}: expected a positive integer")
        if token_dim % (patch_size**2):
            raise CheckpointError(
                f"{path}: token size {token_dim} is not channels x {patch_size}^2 (patch size {patch_size})"
            )
        channels = token_dim // patch_size**2
    else:
        guess = guess_channels_and_patch(token_dim)
        if guess is None:
            raise CheckpointError(
                f"{path}: cannot tell channels and patch size from token size {token_dim}; give the patch size"
            )
        channels, patch_size = guess
    side = round(tokens**0.5)
    if side * side != tokens:
        raise CheckpointError(f"{path}: {tokens} tokens do not form a square image")
    if out_dim not in (token_dim, 2 * token_dim):
        raise CheckpointError(
            f"{path}: proj_out has {out_dim} outputs, expected {token_dim} (VP) or {2 * token_dim} (NVP)"
        )
    if width % REFERENCE_HEAD_DIM:
        raise CheckpointError(
            f"{path}: width {width} is not a multiple of the reference head size {REFERENCE_HEAD_DIM}"
        )
    try:
        cfg = ModelConfig(
            in_channels=channels,
            img_size=patch_size * side,
            patch_size=patch_size,
            width=width,
            num_blocks=blocks,
            layers_per_block=layers,
            head_dim=REFERENCE_HEAD_DIM,
            expansion=hidden // width,
            nvp=out_dim == 2 * token_dim,
            num_classes=num_classes,
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    data = {**_data_from_config(cfg), **data}
    return CheckpointInfo(str(path), "reference", cfg, noise, None, data)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def convert_reference(pth: str | os.PathLike, out_dir: str | os.PathLike, *, patch_size: int | None = None) -> Path:
    """Write a reference `.pth` as a native checkpoint directory computing the same function."""
    model, info = load_checkpoint(pth, patch_size=patch_size)
    return save_checkpoint(
        out_dir, model, noise=info.noise, step=info.step, data=info.data, training={"converted_from": Path(pth).name}
    )
