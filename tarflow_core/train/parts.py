"""The run's parts, built at set-up: the data (train split, held-out split, shape) and the model
with its optimizer, EMA and the augmentation noise generator."""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import ModelConfig, TrainConfig
from ..data import DataError, open_dataset
from ..dist import DistInfo
from ..ema import EMA
from ..model import MLP, Attention, TarFlow
from .micro import check_micro_batch
from .outcome import SetupError

NOISE_SEED_OFFSET = 7_919


@dataclass
class Data:
    cfg: TrainConfig  # with the data path made absolute
    train: Any  # the training split (a dataset)
    test: Any | None  # the held-out split, when evaluating and there is one
    test_note: str  # why there is no held-out split ("" when there is, or none is wanted)
    model_cfg: ModelConfig
    info: dict  # the data's description in config.json and checkpoints


def open_data(cfg: TrainConfig, d: DistInfo) -> Data:
    if cfg.data is None:
        raise SetupError(f"preset {cfg.preset} needs --data: give the path of the training data")
    if cfg.batch_size % d.world_size:
        raise SetupError(
            f"--batch-size {cfg.batch_size} (global) must be a multiple of the number of processes ({d.world_size})"
        )
    check_micro_batch(cfg, d)
    try:
        train = open_dataset(cfg.data, "train", image_size=cfg.img_size, channels=cfg.in_channels, flip=cfg.flip)
    except DataError as e:
        raise SetupError(str(e)) from None
    if cfg.data != "digits":  # saved absolute, so `--resume` works from any directory
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).expanduser().resolve()))
    test, test_note = None, ""
    if cfg.eval_every:
        try:
            test = open_dataset(cfg.data, "test", image_size=train.image_size, channels=train.channels)
        except DataError as e:
            test_note = f"no held-out split for evaluation ({e})"
    model_cfg = cfg.model_config(train.channels, train.image_size, train.num_classes)
    info = {
        "channels": train.channels,
        "image_size": train.image_size,
        "num_classes": model_cfg.num_classes,
        "class_names": list(train.class_names) if model_cfg.num_classes else [],
        "source": str(cfg.data),
    }
    return Data(cfg, train, test, test_note, model_cfg, info)


@dataclass
class Model:
    model: TarFlow
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    noise_gen: torch.Generator  # the augmentation noise: the same on every rank
    fused: bool  # fused AdamW: non-finite steps are skipped on the device


def build_model(cfg: TrainConfig, model_cfg: ModelConfig, d: DistInfo) -> Model:
    torch.manual_seed(cfg.seed)
    model = TarFlow(model_cfg).to(d.device)
    if cfg.zero_init_residual:
        zero_init_residual(model)
    model.set_checkpointing(cfg.checkpointing)
    torch.manual_seed(cfg.seed + d.rank)  # anything else random differs per rank
    fused = d.device.type == "cuda" or bool(os.environ.get("TARFLOW_FUSED_ADAMW"))  # env: test hook for the CPU
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.min_lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )
    ema = make_ema(model, cfg)
    noise_gen = torch.Generator(device=d.device).manual_seed(cfg.seed + NOISE_SEED_OFFSET)
    return Model(model, optimizer, ema, noise_gen, fused)


def zero_init_residual(model: TarFlow) -> None:
    """Zero the output projection (weight and bias) of every attention and MLP branch, so each layer
    starts as the identity and the residual stream carries only the block's input at first. Uses no
    random numbers: the weights stay a function of the seed."""
    outs = [m.proj for m in model.modules() if isinstance(m, Attention)]
    outs += [m.main[-1] for m in model.modules() if isinstance(m, MLP)]
    with torch.no_grad():
        for out in outs:
            out.weight.zero_()
            if out.bias is not None:
                out.bias.zero_()


def param_groups(model: TarFlow, cfg: TrainConfig) -> list[Any]:
    """AdamW's parameters. `--weight-decay-on all`: one group, as the published recipe (and the same
    optimizer state as earlier versions). `matrices`: decay only the weights of linear and convolution
    layers; norms, biases and the positional and class embeddings are gains and offsets, which shrinking
    towards 0 pulls away from what the data need rather than regularising."""
    if cfg.decay_params == "all":
        return list(model.parameters())
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_ema(model: TarFlow, cfg: TrainConfig) -> EMA | None:
    """The run's EMA of the weights (None: off), with its warm-up."""
    return EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup) if cfg.ema_decay else None


class Wrapped(NamedTuple):
    forward: Callable  # the model, maybe in DDP and/or compiled
    no_sync: Callable | None  # DDP's `no_sync` (a backward without the gradient all-reduce); None: one process


def wrap_model(model: TarFlow, cfg: TrainConfig, d: DistInfo) -> Wrapped:
    """The forward the steps call: the model, in DDP when distributed, compiled when asked."""
    wrapped: Any = model
    no_sync = None
    if d.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # `var` is updated identically on every rank: no buffer sync in forward (the flag was
        # renamed in torch 2.13; the old name warns there)
        buffers = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        device_ids = [d.device.index] if d.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, **buffers)
        no_sync = wrapped.no_sync
    return Wrapped(torch.compile(wrapped) if cfg.compile else wrapped, no_sync)
