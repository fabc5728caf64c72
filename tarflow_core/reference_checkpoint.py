"""The published code's checkpoints: `.pth` state dicts, read without unpickling any object.

A reference file holds weights only, so the architecture is read off the tensor shapes and the
noise, data set and patch size off the file name the published trainer gives it. Files are read
with `torch.load(..., weights_only=True)`: a file naming any Python object is refused, not run.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .checkpoint_info import CheckpointError, CheckpointInfo, data_from_config, read_tensors
from .config import ModelConfig
from .load_errors import describe, file_head, not_torch

# the published trainer's `{dataset}_model_{patch}_{width}_{blocks}_{layers}_{noise}.pth`, also as the
# copies downloads make of it: `... (1).pth`, `...-1.pth` (browsers) and `.pth.1` (wget)
REFERENCE_NAME = re.compile(
    r"^(?:(?P<dataset>.+?)_)?model_(?P<patch>\d+)_(?P<width>\d+)_(?P<blocks>\d+)_(?P<layers>\d+)"
    r"_(?P<noise>uniform|\d+(?:\.\d+)?|\.\d+)(?: ?\(\d+\)|-\d+)?(?:\.[A-Za-z]\w*)?(?:\.\d+)?$"
)
REFERENCE_HEAD_DIM = 64
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ------------------------------------------------------------------------------ reading the file


def read_reference_state(path: Path) -> dict[str, torch.Tensor]:
    """A published-code `.pth` (or the same state dict saved as `.safetensors`, as model hubs hold
    them) as a dict of tensors; refuses anything but plain tensors."""
    head = file_head(path, 9)
    if head is not None and len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        obj = read_tensors(path)  # a safetensors header: an 8-byte length, then JSON
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


def check_finite(state: dict[str, torch.Tensor], source: Path) -> None:
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


# ------------------------------------------------------------------------ describing the weights


class TensorShapes(NamedTuple):
    """The architecture as a reference state dict's tensor shapes give it."""

    width: int
    token_dim: int  # channels x patch size^2
    tokens: int
    blocks: int
    layers: int  # per block
    hidden: int  # the MLP's hidden width
    out_dim: int  # token_dim (VP: shift only) or 2 x token_dim (NVP: scale and shift)
    num_classes: int  # 0: unconditional


class NameFacts(NamedTuple):
    """What a reference file's name adds to its tensors."""

    noise: dict[str, Any]
    data: dict[str, Any]  # the data set, as "source", when the name gives it
    patch_size: int | None  # the one asked for, else the name's; None: neither gives it


def reference_info(state: dict[str, torch.Tensor], path: Path, *, patch_size: int | None = None) -> CheckpointInfo:
    """Read the architecture off tensor shapes and the reference file name."""
    shapes = _tensor_shapes(state, path)
    named = _facts_from_name(path, shapes, patch_size)
    channels, patch_size = _channels_and_patch(path, shapes.token_dim, named.patch_size)
    cfg = _reference_config(path, shapes, channels, patch_size)
    data = {**data_from_config(cfg), **named.data}
    return CheckpointInfo(path=str(path), kind="reference", config=cfg, noise=named.noise, step=None, data=data)


def _tensor_shapes(state: dict[str, torch.Tensor], path: Path) -> TensorShapes:
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
    return TensorShapes(width, token_dim, tokens, blocks, layers, hidden, out_dim, num_classes)


def _facts_from_name(path: Path, shapes: TensorShapes, patch_size: int | None) -> NameFacts:
    """Noise, data set and patch size from a published trainer's file name, which must agree with
    the tensors and with a patch size asked for; a file named otherwise adds nothing."""
    name = REFERENCE_NAME.match(path.name)
    noise: dict[str, Any] = {"type": None, "std": None}
    if not name:
        return NameFacts(noise, {}, patch_size)
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
    data = {"source": name["dataset"]} if name["dataset"] else {}
    if (int(name["width"]), int(name["blocks"]), int(name["layers"])) != (shapes.width, shapes.blocks, shapes.layers):
        raise CheckpointError(
            f"{path.name} names width {name['width']}, {_count(int(name['blocks']), 'block')}, "
            f"{_count(int(name['layers']), 'layer')} per block but its tensors hold width {shapes.width}, "
            f"{_count(shapes.blocks, 'block')}, {_count(shapes.layers, 'layer')} per block"
        )
    return NameFacts(noise, data, patch_size)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _channels_and_patch(path: Path, token_dim: int, patch_size: int | None) -> tuple[int, int]:
    """(channels, patch size) of tokens of `token_dim` values: split by the patch size when known,
    else guessed from the token size alone."""
    if patch_size is None:
        guess = guess_channels_and_patch(token_dim)
        if guess is None:
            raise CheckpointError(
                f"{path}: cannot tell channels and patch size from token size {token_dim}; give the patch size"
            )
        return guess
    if patch_size < 1:
        raise CheckpointError(f"patch size {patch_size}: expected a positive integer")
    if token_dim % (patch_size**2):
        raise CheckpointError(
            f"{path}: token size {token_dim} is not channels x {patch_size}^2 (patch size {patch_size})"
        )
    return token_dim // patch_size**2, patch_size


def _reference_config(path: Path, shapes: TensorShapes, channels: int, patch_size: int) -> ModelConfig:
    """The model config of these shapes; shapes no TarFlow of the published code has are refused."""
    side = round(shapes.tokens**0.5)
    if side * side != shapes.tokens:
        raise CheckpointError(f"{path}: {shapes.tokens} tokens do not form a square image")
    token_dim, out_dim, width = shapes.token_dim, shapes.out_dim, shapes.width
    if out_dim not in (token_dim, 2 * token_dim):
        raise CheckpointError(
            f"{path}: proj_out has {out_dim} outputs, expected {token_dim} (VP) or {2 * token_dim} (NVP)"
        )
    if width % REFERENCE_HEAD_DIM:
        raise CheckpointError(
            f"{path}: width {width} is not a multiple of the reference head size {REFERENCE_HEAD_DIM}"
        )
    try:
        return ModelConfig(
            in_channels=channels,
            img_size=patch_size * side,
            patch_size=patch_size,
            width=width,
            num_blocks=shapes.blocks,
            layers_per_block=shapes.layers,
            head_dim=REFERENCE_HEAD_DIM,
            expansion=shapes.hidden // width,
            nvp=out_dim == 2 * token_dim,
            num_classes=shapes.num_classes,
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def guess_channels_and_patch(token_dim: int) -> tuple[int, int] | None:
    """Split D = C * p * p when the patch size is unknown: C=3 if D/3 is a square, else C=1 if D is."""
    if token_dim % 3 == 0 and _is_square(token_dim // 3):
        return 3, math.isqrt(token_dim // 3)
    if _is_square(token_dim):
        return 1, math.isqrt(token_dim)
    return None


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n
