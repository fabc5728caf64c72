"""Distributed training set-up: rank, world size and device from the torchrun environment.

    with distributed("auto") as d:        # reads RANK / WORLD_SIZE / LOCAL_RANK
        ... d.rank, d.world_size, d.device, d.is_main ...

Single process when WORLD_SIZE is unset or 1. Otherwise DDP with NCCL on CUDA and gloo on
CPU; each rank uses cuda:LOCAL_RANK. If a process group already exists (a test or an outer
launcher made it) it is used as is and left for its owner to destroy.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as tdist


class DistError(RuntimeError):
    pass


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class EnvWorld(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def env_world() -> EnvWorld:
    """This process's place from torchrun's environment variables (0, 1, 0 if unset)."""

    def get(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value) if value.strip() else default
        except ValueError:
            raise DistError(f"environment variable {name}={value!r} is not an integer") from None

    world = get("WORLD_SIZE", 1)
    rank = get("RANK", 0)
    local = get("LOCAL_RANK", rank if world > 1 else 0)
    if world < 1 or not 0 <= rank < world:
        raise DistError(f"RANK={rank} is not in WORLD_SIZE={world}")
    return EnvWorld(rank, world, local)


def resolve_device(
    spec: str | torch.device = "auto", local_rank: int = 0, distributed: bool = False, option: str = "--device"
) -> torch.device:
    """`auto`: cuda:LOCAL_RANK when CUDA is present, else CPU. Under DDP a bare `cuda` means cuda:LOCAL_RANK.
    Errors name the device as `option` says (the CLI's option, or an API argument)."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DistError(f"{option} {spec}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistError(f"{option} {spec}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise DistError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) are present")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DistError(f"{option} {spec}: MPS is not available on this machine")
        if distributed:
            raise DistError("distributed training needs CUDA (NCCL) or CPU (gloo), not MPS")
    elif device.type != "cpu":
        raise DistError(f"{option} {spec}: expected auto, cpu, cuda, cuda:N or mps")
    return device


@contextlib.contextmanager
def distributed(device: str | torch.device = "auto", timeout_minutes: float = 30) -> Iterator[DistInfo]:
    """Join the torchrun process group (if any) for the duration of the block."""
    rank, world, local = env_world()
    if tdist.is_available() and tdist.is_initialized():
        world, rank = tdist.get_world_size(), tdist.get_rank()
        dev = resolve_device(device, local, world > 1)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        yield DistInfo(rank, world, local, dev, tdist.get_backend())
        return
    dev = resolve_device(device, local, world > 1)
    if world == 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        yield DistInfo(0, 1, 0, dev, None)
        return
    if not tdist.is_available():
        raise DistError("this PyTorch build has no torch.distributed support")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if dev.type == "cuda":
        try:  # binding the device up front lets NCCL set up eagerly (torch >= 2.3)
            tdist.init_process_group(backend, timeout=timeout, device_id=dev)
        except TypeError:
            tdist.init_process_group(backend, timeout=timeout)
    else:
        tdist.init_process_group(backend, timeout=timeout)
    try:
        yield DistInfo(rank, world, local, dev, backend)
    except BaseException:
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()
        raise
    with contextlib.suppress(Exception):
        if backend == "gloo":  # every rank's collectives finished before any tears down: a gloo
            # thread still holding a pending one aborts the process at exit (seen once, exit -6
            # after a finished run); bounded, and quick to fail when a peer is gone
            tdist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    with contextlib.suppress(Exception):
        tdist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over ranks in place (no-op in a single process)."""
    if info.distributed:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        t.div_(info.world_size)
    return t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def broadcast_object(value, info: DistInfo, src: int = 0):
    """Rank `src`'s picklable `value`, on every rank (the value itself in a single process)."""
    if not info.distributed:
        return value
    obj = [value]
    tdist.broadcast_object_list(obj, src=src)
    return obj[0]


def any_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank when any rank's flag is true."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=info.device if info.backend == "nccl" else "cpu")
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())
