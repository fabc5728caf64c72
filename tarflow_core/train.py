"""Training: `train(cfg, emit=..., stop=...)` runs one TarFlow training run. No printing.

The run directory (SPEC "tarflow train") holds `config.json`, `events.jsonl` (one JSON event per
line, see `events.py`), `checkpoints/step-XXXXXXXX/` (native checkpoints + `train_state.pt`)
and `samples/` (PNG grids of fixed noise and labels). Only rank 0 writes.

The recipe is the reference's: Gaussian noise augmentation (or uniform dequantization for
likelihood runs), loss 0.5 * mean(z^2) - mean(logdet) / D, AdamW (0.9, 0.95), linear warm-up
then cosine decay, label drop (-1) for conditional runs, the VP prior update after each step,
bf16 autocast on CUDA. Metrics stay on the device and are read at log intervals; non-finite
steps are skipped without updating anything.

Exactness: the data order comes from (seed, epoch) and the augmentation noise from one
generator replicated on every rank (each rank takes its share of the global batch's draw), so
a resumed run continues bit-exactly on CPU and N processes see the same global batch as one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import resource
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError

from . import __version__, flow
from .atomic import atomic_path, atomic_write_text
from .checkpoint import CHECKPOINTS_DIR, EMA_FILE, MODEL_FILE, RESUME_STATE_FILE, list_checkpoints, save_checkpoint
from .data import DataError, open_dataset, make_loader
from .dist import DistError, DistInfo, all_reduce_mean, all_reduce_sum, any_flag, broadcast_object, distributed
from .ema import EMA
from .events import EVENTS_FILE, JsonlSink, dumps, make_event, stopped
from .model import TarFlow
from .presets import ConfigError, TrainConfig

TRAIN_STATE_FILE = RESUME_STATE_FILE
LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
SAMPLES_DIR = "samples"
STATE_FORMAT = "tarflow-train-state"
SAMPLE_SEED_OFFSET = 1_000_003
NOISE_SEED_OFFSET = 7_919
EVAL_SEED = 20250101

StopLike = threading.Event | Callable[[], bool] | None
BatchHook = Callable[[int, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]


class TrainError(RuntimeError):
    """A run that cannot start or go on; `exit_code` 2 for bad usage/input, 1 for run-time failures."""

    exit_code = 1


class SetupError(TrainError):
    """Bad settings, data or run directory, found before training starts."""

    exit_code = 2


@dataclass
class TrainResult:
    status: str  # finished / interrupted / failed
    step: int
    run_dir: Path
    reason: str = ""
    checkpoint: Path | None = None

    @property
    def exit_code(self) -> int:
        return {"finished": 0, "interrupted": 130}.get(self.status, 1)


# ------------------------------------------------------------------------------- small pieces


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for the step with 0-based index `step`: linear warm-up from `min_lr`
    over `warmup_steps`, then cosine decay to `min_lr` at `total_steps` (the reference schedule)."""
    if warmup_steps > 0 and step < warmup_steps:
        return min_lr + step / warmup_steps * (lr - min_lr)
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (lr - min_lr)


def objective(z: torch.Tensor, logdet: torch.Tensor, data_dim: int) -> torch.Tensor:
    """The reference's loss: 0.5 * mean(z^2) - mean(logdet) / D (nats per dimension, up to constants)."""
    return 0.5 * z.float().pow(2).mean() - (logdet.float() / data_dim).mean()


@contextlib.contextmanager
def stop_on_signals(
    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), echo_window: float | None = None
) -> Iterator[threading.Event]:
    """An Event set by the first SIGINT/SIGTERM (the run then finishes its step, checkpoints and
    ends); a second one raises KeyboardInterrupt. Outside the main thread it only yields an Event.

    Under torchrun a Ctrl-C (or a scheduler's SIGTERM to the job) reaches each worker twice: from
    the terminal and, a moment later, forwarded by the launcher. A repeat of the same signal
    within `echo_window` seconds (default: 1 s in a distributed run, else 0) is taken as that
    echo, not as a second request, so the workers still save their checkpoint."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    if echo_window is None:
        echo_window = 1.0 if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0.0
    first: list[tuple[int, float]] = []

    def handler(signum, frame):  # noqa: ARG001
        now = time.monotonic()
        if event.is_set():
            if first and first[0][0] == signum and now - first[0][1] < echo_window:
                return
            raise KeyboardInterrupt
        first.append((signum, now))
        event.set()

    old = {}
    for s in signals:
        old[s] = signal.signal(s, handler)
    try:
        yield event
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def default_run_dir(cfg: TrainConfig, root: str = "runs") -> Path:
    """runs/<preset>-<date>-<time>, with a -2, -3... suffix if that name is taken."""
    base = Path(root) / f"{cfg.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"step-{step:08d}"


def resumable_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints with a train state under `run_dir`, oldest first."""
    return list_checkpoints(run_dir, extra_files=(TRAIN_STATE_FILE,))


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The `TrainConfig` saved in a run directory's `config.json`."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        if resumable_checkpoints(run_dir):
            raise SetupError(
                f"{run_dir} has checkpoints but no {CONFIG_FILE} (the run's settings), so it cannot "
                f"be resumed; its checkpoints still load with --ckpt {run_dir}"
            )
        raise SetupError(f"{run_dir} is not a tarflow run directory (no {CONFIG_FILE})")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SetupError(f"{path} is not a readable tarflow run config ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), dict):
        raise SetupError(f"{path} is not a tarflow run config (it has no 'train' settings)")
    try:
        return TrainConfig.from_dict(raw["train"])
    except (ValueError, TypeError) as e:
        why = str(e) if isinstance(e, ValueError) else f"a setting has the wrong type: {e}"
        raise SetupError(f"{path} is not a valid tarflow run config ({why})") from None


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> dict[str, int]:
    """Model-space NCHW images -> one PNG grid (atomic), upscaled so small images stay visible.
    Returns the layout: `nrow` (images per row), `tile` (pixels per image side), `padding`."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    n, c, h, w = x.shape
    scale = max(1, 32 // max(h, w))
    if scale > 1:
        x = x.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    ncol = nrow or math.ceil(math.sqrt(n))
    rows, pad = math.ceil(n / ncol), 2
    grid = np.zeros((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[top : top + h, left : left + w] = x[i].transpose(1, 2, 0)
    img = Image.fromarray(grid[:, :, 0] if c == 1 else grid, "L" if c == 1 else "RGB")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return {"nrow": ncol, "tile": h, "padding": pad}


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------ trainer


class _Trainer:
    """One run's state. `train()` builds it, calls `run()`, and always closes the event file."""

    def __init__(self, cfg: TrainConfig, d: DistInfo, emit, stop: StopLike, resume: bool, batch_hook: BatchHook | None):
        self.cfg, self.d, self.stop, self.resume, self.batch_hook = cfg, d, stop, resume, batch_hook
        self.user_emit = emit
        self.sink: JsonlSink | None = None
        self.lock_file = None
        self.device = d.device
        self.last_checkpoint: Path | None = None
        self.consecutive_bad = 0

    # -------------------------------------------------------------------------------- events
    def emit(self, kind: str, step: int, **fields: Any) -> None:
        if not self.d.is_main:
            return
        event = make_event(kind, step, **fields)
        if self.sink is not None:
            try:
                self.sink(event)
            except OSError as e:  # e.g. a full disk: stop writing events, end the run
                self.sink = None
                raise TrainError(f"cannot write {self.run_dir / EVENTS_FILE}: {e.strerror or e}") from None
        if self.user_emit is not None:
            self.user_emit(event)

    # --------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, d = self.cfg, self.d
        if cfg.data is None:
            raise SetupError(f"preset {cfg.preset} needs --data: give the path of the training data")
        if cfg.batch_size % d.world_size:
            raise SetupError(
                f"--batch-size {cfg.batch_size} (global) must be a multiple of the number of processes ({d.world_size})"
            )
        self.local_batch = cfg.batch_size // d.world_size

        try:
            self.train_ds = open_dataset(
                cfg.data, "train", image_size=cfg.image_size, channels=cfg.channels, flip=cfg.flip
            )
        except DataError as e:
            raise SetupError(str(e)) from None
        if cfg.data != "digits":  # saved absolute, so `--resume` works from any directory
            self.cfg = cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).expanduser().resolve()))
        self.test_ds = None
        self.test_note = ""
        if cfg.eval_every:
            try:
                self.test_ds = open_dataset(
                    cfg.data, "test", image_size=self.train_ds.image_size, channels=self.train_ds.channels
                )
            except DataError as e:
                self.test_note = f"no held-out split for evaluation ({e})"
        ds = self.train_ds
        self.model_cfg = cfg.model_config(ds.channels, ds.image_size, ds.num_classes)
        self.data_info = {
            "channels": ds.channels,
            "image_size": ds.image_size,
            "num_classes": self.model_cfg.num_classes,
            "class_names": list(ds.class_names) if self.model_cfg.num_classes else [],
            "source": str(cfg.data),
        }
        self.run_dir = self._prepare_run_dir()

        try:
            self.loader = make_loader(
                ds, self.local_batch, cfg.seed, d.rank, d.world_size, cfg.workers, self.device, drop_last=True
            )
        except DataError as e:
            raise SetupError(str(e)) from None
        self.steps_per_epoch = len(self.loader)
        if cfg.max_steps is not None:
            self.total_steps = int(cfg.max_steps)
        else:
            self.total_steps = max(1, math.ceil(float(cfg.epochs) * self.steps_per_epoch))
        warm = self.steps_per_epoch if cfg.warmup_steps is None else int(cfg.warmup_steps)
        self.warmup_steps = min(warm, max(0, self.total_steps - 1))

        torch.manual_seed(cfg.seed)
        self.model = TarFlow(self.model_cfg).to(self.device)
        torch.manual_seed(cfg.seed + d.rank)  # anything else random differs per rank
        fused = self.device.type == "cuda"
        self.fused = fused or bool(os.environ.get("TARFLOW_FUSED_ADAMW"))  # env: test hook for the CPU
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.min_lr,
            betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay,
            fused=self.fused or None,
        )
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + NOISE_SEED_OFFSET)
        self.step = 0
        self.resumed_from: str | None = None
        self.resume_note: str | None = None
        self.schedule_note: str | None = None
        self.settings_note: str | None = None
        if self.resume:
            self._load_state()

        self.precision = cfg.resolved_precision(self.device.type)
        self.autocast_dtype = torch.bfloat16 if self.precision == "bf16" else None
        self.ddp = self.model
        if d.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # `var` is updated identically on every rank: no buffer sync in forward (the flag was
            # renamed in torch 2.13; the old name warns there)
            no_sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": False}
            )
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **no_sync
            )
        self.forward = torch.compile(self.ddp) if cfg.compile else self.ddp

        g = torch.Generator().manual_seed(cfg.seed + SAMPLE_SEED_OFFSET)
        mc = self.model_cfg
        self.sample_noise = torch.randn(cfg.num_samples, mc.num_patches, mc.token_dim, generator=g)
        self.sample_labels = (torch.arange(cfg.num_samples) % mc.num_classes) if mc.conditional else None
        self._check_disk()

    def _prepare_run_dir(self) -> Path:
        cfg, d = self.cfg, self.d
        run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
        if not cfg.run_dir:  # the time stamp must be rank 0's
            run_dir = Path(broadcast_object(str(run_dir), d))
        error = None
        if d.is_main:
            try:
                if self.resume:
                    if not resumable_checkpoints(run_dir):
                        raise SetupError(
                            f"--resume {run_dir}: no complete checkpoint with {TRAIN_STATE_FILE} "
                            f"under {run_dir / CHECKPOINTS_DIR}"
                        )
                elif (
                    (run_dir / EVENTS_FILE).exists()
                    or any((run_dir / CHECKPOINTS_DIR).glob("step-*"))
                    or (run_dir / CONFIG_FILE).exists()
                    and not (run_dir / MODEL_FILE).exists()
                ):
                    raise SetupError(
                        f"run directory {run_dir} already holds a run; continue it with "
                        f"--resume {run_dir} or choose another --run-dir"
                    )
                elif (run_dir / MODEL_FILE).exists():  # its config.json would be overwritten
                    raise SetupError(
                        f"--run-dir {run_dir} is a checkpoint directory ({MODEL_FILE}); choose another --run-dir"
                    )
                self._probe_writable(run_dir)
                self._lock(run_dir)
            except SetupError as e:
                error = str(e)
        error = broadcast_object(error, d)
        if error:
            raise SetupError(error)
        return run_dir

    def _lock(self, run_dir: Path) -> None:
        """Hold the run directory for this run: a second `train` on it (say `--resume` of a run that
        is still going) would interleave both runs' checkpoints and events."""
        import fcntl

        lock = None
        try:
            lock = open(run_dir / LOCK_FILE, "a+")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            lock.close()
            raise SetupError(
                f"run directory {run_dir} is in use by another tarflow train"
                f"{f' (process {holder})' if holder else ''}; wait for it to end or stop it first"
            ) from None
        except OSError:  # a file system without locks: go on unguarded
            if lock is not None:
                lock.close()
            return
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self.lock_file = lock

    @staticmethod
    def _probe_writable(run_dir: Path) -> None:
        if run_dir.exists() and not run_dir.is_dir():
            raise SetupError(f"run directory {run_dir} exists and is not a directory")
        try:
            for sub in ("", CHECKPOINTS_DIR, SAMPLES_DIR):
                (run_dir / sub).mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise SetupError(
                f"cannot write to run directory {run_dir} ({e.strerror or e}); choose a writable --run-dir"
            ) from None

    def _check_disk(self) -> None:
        """Refuse to start when the run directory's disk cannot hold two checkpoints."""
        if not self.d.is_main:
            return
        n = self.model.num_parameters()
        per_ckpt = 4 * n * (1 + 2 + (1 if self.ema else 0)) + (1 << 20)
        free = shutil.disk_usage(self.run_dir).free
        if free < 2 * per_ckpt:
            raise TrainError(
                f"not enough free disk space in {self.run_dir}: {free / 2**20:.0f} MiB free, "
                f"about {2 * per_ckpt / 2**20:.0f} MiB needed for checkpoints"
            )

    def _load_state(self) -> None:
        found = resumable_checkpoints(self.run_dir)
        step, ckpt = found[-1]
        hint = f"; remove {ckpt} to resume from the checkpoint at step {found[-2][0]}" if len(found) > 1 else ""

        def damaged(name: str, e: BaseException) -> SetupError:
            why = (
                f"cannot be read ({e.strerror})"
                if isinstance(e, OSError) and e.strerror
                else "is damaged or not from a tarflow run"
            )
            return SetupError(f"cannot resume from {ckpt}: {name} {why}{hint}")

        import warnings

        from safetensors.torch import load_file

        try:
            with warnings.catch_warnings():  # a foreign pickle's protocol warning says nothing useful here
                warnings.simplefilter("ignore")
                state = torch.load(ckpt / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling a damaged file raises many kinds
            raise damaged(TRAIN_STATE_FILE, e) from None
        needed = ("step", "optimizer", "data", "rng")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or any(k not in state for k in needed):
            raise damaged(TRAIN_STATE_FILE, ValueError("not a tarflow training state"))
        tensors = {}
        for name in (MODEL_FILE, EMA_FILE):
            if name == EMA_FILE and not (self.ema is not None and (ckpt / EMA_FILE).is_file()):
                continue
            try:
                tensors[name] = load_file(str(ckpt / name))
            except (OSError, SafetensorError, ValueError, RuntimeError) as e:
                raise damaged(name, e) from None
        try:
            self.model.load_state_dict(tensors[MODEL_FILE])
        except RuntimeError as e:
            raise SetupError(
                f"cannot resume from {ckpt}: {MODEL_FILE} does not match the architecture in "
                f"{self.run_dir / CONFIG_FILE}{hint}"
            ) from None
        try:
            self.loader.load_state_dict(state["data"])
        except DataError as e:  # the data changed under the run (a folder that grew, another file)
            raise SetupError(f"{e} (--data {self.cfg.data}); resume with the data the run was trained on") from None
        except (KeyError, ValueError, TypeError) as e:
            raise damaged(TRAIN_STATE_FILE, e) from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.noise_gen.set_state(state["rng"]["noise"])
            torch.set_rng_state(state["rng"]["torch"])
            if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            raise damaged(TRAIN_STATE_FILE, e) from None
        if self.ema is not None:
            if EMA_FILE in tensors:
                try:
                    self.ema.load_state_dict(tensors[EMA_FILE], state.get("ema_updates", 0))
                except (RuntimeError, KeyError, ValueError, TypeError) as e:
                    raise damaged(EMA_FILE, e) from None
            else:
                self.ema = EMA(self.model, self.cfg.ema_decay)
        self.step = int(state["step"])
        self.consecutive_bad = int(state.get("bad_steps", 0))
        self.resumed_from = str(ckpt)
        self.last_checkpoint = ckpt  # the state it holds is the state now: finishing at once needs no new save
        schedule = state.get("schedule") if isinstance(state.get("schedule"), dict) else {}
        saved_total = schedule.get("total_steps")
        if saved_total is not None and int(saved_total) != self.total_steps:
            self.schedule_note = (
                f"the run length changed from {int(saved_total)} to {self.total_steps} steps: the "
                f"learning-rate schedule is recomputed for the new length (lr {self._lr_now(saved_total):.3g} "
                f"-> {self._lr_now(self.total_steps):.3g} at step {self.step}), so the run does "
                "not continue exactly as it would have"
            )
        try:
            saved_cfg = json.loads((ckpt / CONFIG_FILE).read_text()).get("training") or {}
        except (OSError, ValueError, AttributeError):
            saved_cfg = {}
        changed = [
            f"--{k.replace('_', '-')} {saved_cfg[k]} -> {getattr(self.cfg, k)}"
            for k in ("lr", "min_lr", "grad_clip")
            if k in saved_cfg and saved_cfg[k] != getattr(self.cfg, k)
        ]
        if changed:
            self.settings_note = (
                f"resumed with changed optimisation settings ({', '.join(changed)}): the run does "
                "not continue exactly as it would have"
            )
        saved_world = int(state.get("world_size", self.d.world_size))
        if saved_world != self.d.world_size:
            self.resume_note = (
                f"resumed with {self.d.world_size} process(es) where the run used {saved_world}: "
                "the data continue from the same global position, but per-process batches "
                "differ, so the weights will not match an uninterrupted run exactly"
            )

    def _lr_now(self, total_steps: int) -> float:
        """The learning rate of the next step in a run of `total_steps` (warm-up as that run's)."""
        warmup = min(
            self.steps_per_epoch if self.cfg.warmup_steps is None else int(self.cfg.warmup_steps),
            max(0, int(total_steps) - 1),
        )
        return lr_at(
            self.step, lr=self.cfg.lr, min_lr=self.cfg.min_lr, warmup_steps=warmup, total_steps=int(total_steps)
        )

    # --------------------------------------------------------------------------------- steps
    def _augment(self, x_u8: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 batch -> noisy model-space input and (dropped) labels. The random draws are for
        the global batch, from a generator every rank holds identically; each rank keeps its share."""
        cfg, d = self.cfg, self.d
        x = x_u8.to(self.device, non_blocking=True)
        shape = (self.cfg.batch_size, *x.shape[1:])
        r, w = d.rank, d.world_size
        if cfg.noise == "uniform":
            u = torch.rand(shape, generator=self.noise_gen, device=self.device)[r::w]
            xf = (x.float() + u) / 256 * 2 - 1
        else:
            eps = torch.randn(shape, generator=self.noise_gen, device=self.device)[r::w]
            xf = flow.uint8_to_model(x) + cfg.noise_std * eps
        labels = None
        if self.model_cfg.conditional:
            labels = y.to(self.device, non_blocking=True).long()
            if cfg.label_drop > 0:
                drop = torch.rand(cfg.batch_size, generator=self.noise_gen, device=self.device)[r::w] < cfg.label_drop
                labels = torch.where(drop, torch.full_like(labels, -1), labels)
        return xf, labels

    def _train_step(self, x_u8: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimisation step; returns the on-device `ok` flag. Non-finite steps change nothing."""
        cfg, mc = self.cfg, self.model_cfg
        x, labels = self._augment(x_u8, y)
        if self.batch_hook is not None:
            x, labels = self.batch_hook(self.step, x, labels)
        lr = lr_at(
            self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            z, logdet = self.forward(x, labels)
        z = z.float()
        loss = objective(z, logdet, mc.data_dim)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.grad_clip_value:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_value, foreach=True)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
        ok = torch.isfinite(loss) & torch.isfinite(grad_norm)

        # Skipped steps change nothing. Fused: skip on the device (no host sync); else on the host.
        # VP prior: running mean of z^2 per token and dim over the global batch; every rank joins
        # its all-reduce, also on a skipped step, and the gate then leaves `var` as it is.
        ok_host = None if self.fused else bool(ok)
        if self.fused:
            self.optimizer.found_inf = (~ok).float()
            self.optimizer.step()
        elif ok_host:
            self.optimizer.step()
        if not mc.nvp:
            self.model.update_prior(z, reduce=lambda t: all_reduce_mean(t, self.d), gate=None if ok_host else ok)
        if self.ema is not None:
            if self.fused:
                self.ema.update(self.model, gate=ok)
            elif ok_host:
                self.ema.update(self.model)

        with torch.no_grad():
            logdet_pd = (logdet.float() / mc.data_dim).mean()
            if mc.nvp:
                nll = loss + 0.5 * flow.LOG_2PI
            else:
                var = self.model.var
                nll = (
                    0.5 * (z.detach().pow(2) / var).mean()
                    + 0.5 * torch.log(var).mean()
                    + 0.5 * flow.LOG_2PI
                    - logdet_pd
                )
            vals = torch.stack(
                [loss.detach(), nll.detach(), logdet_pd, grad_norm.detach().float(), torch.ones((), device=loss.device)]
            )
            self.acc += torch.where(ok, vals, torch.zeros_like(vals)).nan_to_num(0.0)
            bad = (~ok).float()
            self.bad_in_interval += bad
            self.bad_run = (self.bad_run + 1) * bad
        return ok

    # ------------------------------------------------------------------------------ outputs
    def _eval_model(self) -> tuple[TarFlow, str]:
        if self.ema is None:
            return self.model, "model"
        if getattr(self, "_ema_model", None) is None:
            self._ema_model = TarFlow(self.model_cfg).to(self.device)
        self.ema.copy_to(self._ema_model)
        return self._ema_model, "ema"

    @torch.no_grad()
    def evaluate(self) -> None:
        """Held-out bpd: uniform dequantization from a fixed seed, over a fixed subset, all ranks."""
        if self.test_ds is None:
            return
        from .likelihood import bpd as bpd_fn

        model, which = self._eval_model()
        ds, d = self.test_ds, self.d
        n = len(ds) if self.cfg.eval_images is None else min(len(ds), self.cfg.eval_images)
        idx = list(range(d.rank, n, d.world_size))
        gen = torch.Generator(device=self.device).manual_seed(EVAL_SEED + d.rank)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        bs = max(1, min(256, self.local_batch * 2))
        was_training = model.training
        model.eval()
        for s in range(0, len(idx), bs):
            items = [ds[i] for i in idx[s : s + bs]]
            x = torch.stack([it[0] for it in items]).to(self.device)
            y = torch.tensor([it[1] for it in items], device=self.device) if self.model_cfg.conditional else None
            b = bpd_fn(model, x, y, generator=gen).double()
            b = torch.nan_to_num(b, nan=float("inf"))
            total += torch.stack([b.sum(), torch.tensor(float(len(items)), dtype=torch.float64, device=self.device)])
        model.train(was_training)
        all_reduce_sum(total, d)
        s, count = total.tolist()
        value = s / count if count else float("nan")
        self.emit("eval", self.step, bpd=value, images=int(count), split="test", weights=which)

    @torch.no_grad()
    def sample(self) -> None:
        if not self.d.is_main:
            return
        from .sampling import generate

        model, which = self._eval_model()
        cfg = self.cfg
        sigma = cfg.noise_std if cfg.noise == "gaussian" else None
        ctx = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype
            else contextlib.nullcontext()
        )
        with ctx:
            res = generate(
                model,
                cfg.num_samples,
                generator=torch.Generator().manual_seed(cfg.seed + 1),
                batch_size=min(cfg.num_samples, 256),
                labels=self.sample_labels,
                noise=self.sample_noise,
                denoise_sigma=sigma,
                cuda_graphs=False,
            )  # previews are short and run beside DDP's threads: no capture
        k = self.model_cfg.num_classes
        nrow = k if k and cfg.num_samples % k == 0 and k <= 32 else None
        path = self.run_dir / SAMPLES_DIR / f"step-{self.step:08d}.png"
        layout = save_grid(res.images, path, nrow=nrow)
        self.emit(
            "sample",
            self.step,
            path=str(path),
            num=cfg.num_samples,
            **layout,
            weights=which,
            denoised=sigma is not None,
            redrawn=res.redrawn,
        )

    def save(self) -> Path | None:
        """Checkpoint (rank 0 writes; every rank learns whether it worked)."""
        error = None
        target = checkpoint_dir(self.run_dir, self.step)
        if self.d.is_main:
            try:
                self._write_checkpoint(target)
            except (OSError, SafetensorError) as e:
                error = f"could not write checkpoint {target}: {getattr(e, 'strerror', None) or e}"
        error = broadcast_object(error, self.d)
        if error:
            raise TrainError(error)
        self.last_checkpoint = target
        self.emit("checkpoint", self.step, path=str(target))
        return target

    def _write_checkpoint(self, target: Path) -> None:
        cfg = self.cfg
        training = {
            **cfg.to_dict(),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "world_size": self.d.world_size,
            "precision": self.precision,
        }
        ema_state = self.ema.state_dict() if self.ema is not None else None
        save_checkpoint(
            target,
            self.model,
            noise=cfg.noise_spec,
            step=self.step,
            data=self.data_info,
            training=training,
            ema_state=ema_state,
        )
        rng = {
            "noise": self.noise_gen.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        state = {
            "format": STATE_FORMAT,
            "version": 1,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "schedule": {
                "lr": cfg.lr,
                "min_lr": cfg.min_lr,
                "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps,
            },
            "data": self.loader.state_dict(),
            "rng": rng,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "bad_steps": self.consecutive_bad,
            "world_size": self.d.world_size,
        }
        with atomic_path(target / TRAIN_STATE_FILE) as tmp:
            torch.save(state, tmp)
        self._prune()

    def _prune(self) -> None:
        """Keep the newest `keep_checkpoints` resumable checkpoints; remove the older ones, also
        those a killed process left half-written or half-removed, and the temporary folders of
        saves that never finished (each as big as a checkpoint)."""
        keep = self.cfg.keep_checkpoints
        done = resumable_checkpoints(self.run_dir)
        oldest_kept = done[-keep][0] if keep and len(done) >= keep else (done[0][0] if done else None)
        for entry in (self.run_dir / CHECKPOINTS_DIR).iterdir():
            m = re.fullmatch(r"step-(\d+)", entry.name)
            if m:
                stale = bool(keep) and oldest_kept is not None and int(m.group(1)) < oldest_kept
            else:  # `.step-N.XXXX.tmp` / `.step-N.old-PID`: this process has no save in flight now
                stale = re.fullmatch(r"\.step-\d+\..+", entry.name) is not None
            if stale and entry.is_dir():
                with contextlib.suppress(OSError):
                    (entry / TRAIN_STATE_FILE).unlink(missing_ok=True)  # not resumable first, then gone
                shutil.rmtree(entry, ignore_errors=True)

    def write_config(self) -> None:
        if not self.d.is_main:
            return
        doc = {
            "format": "tarflow-run",
            "tarflow_version": __version__,
            "train": self.cfg.to_dict(),
            "model": self.model_cfg.to_dict(),
            "data": self.data_info,
            "noise": self.cfg.noise_spec,
            "world_size": self.d.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }
        atomic_write_text(self.run_dir / CONFIG_FILE, json.dumps(doc, indent=2, default=str) + "\n")

    # ---------------------------------------------------------------------------------- loop
    def log(self, interval_steps: int, elapsed: float) -> None:
        acc = all_reduce_sum(self.acc.clone(), self.d)
        loss, nll, logdet, gnorm, count = acc.tolist()
        self.acc.zero_()
        self.bad_in_interval.zero_()
        ips = self.cfg.batch_size * interval_steps / max(elapsed, 1e-9)
        if count > 0:
            loss, nll, logdet, gnorm = (v / count for v in (loss, nll, logdet, gnorm))
            bpd = flow.nats_to_bpd(nll)
        else:
            loss = nll = logdet = gnorm = bpd = float("nan")
        self.emit(
            "train",
            self.step,
            loss=loss,
            nll=nll,
            bpd=bpd,
            logdet=logdet,
            lr=self.lr,
            grad_norm=gnorm,
            images_per_s=ips,
            tflops=3 * self.model_cfg.flops_per_image() * ips / 1e12,
            memory_mb=memory_mb(self.device),
            epoch=self.step / self.steps_per_epoch,
            total_steps=self.total_steps,
        )

    def _due(self, every: int) -> bool:
        return bool(every) and self.step % every == 0

    def run(self) -> TrainResult:
        cfg, d = self.cfg, self.d
        self.write_config()
        self.emit(
            "start",
            self.step,
            config=cfg.to_dict(),
            model=self.model_cfg.to_dict(),
            parameters=self.model.num_parameters(),
            data={
                **self.data_info,
                "train": self.train_ds.description,
                "test": self.test_ds.description if self.test_ds else None,
                "train_images": len(self.train_ds),
                "skipped": int(getattr(self.train_ds, "skipped", 0)),
            },
            world_size=d.world_size,
            device=str(self.device),
            precision=self.precision,
            global_batch=cfg.batch_size,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            run_dir=str(self.run_dir),
            resumed_from=self.resumed_from,
            tarflow_version=__version__,
        )
        if self.train_ds.skipped:
            self.emit("warning", self.step, message=f"{self.train_ds.skipped} unreadable files skipped in {cfg.data}")
        if self.test_note:
            self.emit("warning", self.step, message=self.test_note)
        if self.resume_note:
            self.emit("warning", self.step, message=self.resume_note, reason="world_size")
        if self.schedule_note:
            self.emit("warning", self.step, message=self.schedule_note, reason="schedule")
        if self.settings_note:
            self.emit("warning", self.step, message=self.settings_note, reason="settings")
        self.late_skips_reported = 0
        self.acc = torch.zeros(5, device=self.device)
        self.bad_in_interval = torch.zeros((), device=self.device)
        self.bad_run = torch.full((), float(self.consecutive_bad), device=self.device)
        self.model.train()
        stop_every = 1 if not d.distributed else max(1, min(cfg.log_every or 10, 10))
        log_every = cfg.log_every or max(1, self.total_steps // 100)
        t_mark, steps_mark, side_time = time.perf_counter(), self.step, 0.0

        if self.step >= self.total_steps:
            return self._finish("finished", f"already at step {self.step} of {self.total_steps}")
        while True:
            for x_u8, y in self.loader:
                ok = self._train_step(x_u8, y)
                self.step += 1
                if not self.fused:
                    if bool(ok):
                        self.consecutive_bad = 0
                    else:
                        self.consecutive_bad += 1
                        self.emit(
                            "warning",
                            self.step,
                            message=f"non-finite loss or gradient at step {self.step}: "
                            f"step skipped ({self.consecutive_bad} in a row)",
                            reason="nonfinite",
                        )
                last = self.step >= self.total_steps
                if self.step % log_every == 0 or last:
                    if self.fused:
                        bad_now, run_now = int(self.bad_in_interval.item()), int(self.bad_run.item())
                        self.consecutive_bad = run_now
                        if bad_now:
                            self.emit(
                                "warning",
                                self.step,
                                reason="nonfinite",
                                message=f"{bad_now} step(s) with non-finite loss or gradient skipped "
                                f"({run_now} in a row at step {self.step})",
                            )
                    self.log(self.step - steps_mark, time.perf_counter() - t_mark - side_time)
                    self._report_late_skips()
                    t_mark, steps_mark, side_time = time.perf_counter(), self.step, 0.0
                if self.consecutive_bad >= cfg.max_bad_steps:
                    reason = (
                        f"{self.consecutive_bad} consecutive steps had non-finite loss or gradients "
                        f"(last at step {self.step}); {self._after_divergence()}"
                    )
                    return self._finish("failed", reason, save=False)
                t0 = time.perf_counter()
                if self._due(cfg.eval_every) or (last and cfg.eval_every):
                    self.evaluate()
                if self._due(cfg.sample_every) or (last and cfg.sample_every):
                    self.sample()
                if last:
                    return self._finish("finished", f"reached step {self.total_steps}")
                if self._due(cfg.checkpoint_every) and self.consecutive_bad == 0:
                    self.save()  # not inside a run of skipped steps: older checkpoints must survive it
                side_time += time.perf_counter() - t0
                want_stop = stopped(self.stop)
                if d.distributed:
                    want_stop = any_flag(want_stop, d) if self.step % stop_every == 0 else False
                if want_stop:
                    if self.step > steps_mark:  # the partial interval's numbers, so even a short run has some
                        self.log(self.step - steps_mark, time.perf_counter() - t_mark - side_time)
                    return self._finish("interrupted", "stopped by the user")

    def _after_divergence(self) -> str:
        """What is kept after a run of non-finite steps, and how to go on from it."""
        remedy = "a lower --lr or a --grad-clip"
        saved = resumable_checkpoints(self.run_dir) if self.d.is_main else []
        if not saved:
            return f"no checkpoint was saved: start again with {remedy}"
        step, path = saved[-1]
        first_bad = self.step - self.consecutive_bad + 1
        if step == first_bad - 1:  # its weights are the ones every later step failed on
            older = (
                f"remove {path} to resume from step {saved[-2][0]}"
                if len(saved) > 1
                else "no earlier checkpoint is left: start again"
            )
            return f"the newest checkpoint (step {step}) holds the weights those steps failed on; {older} with {remedy}"
        return f"the last good checkpoint (step {step}) is kept: resume with --resume {self.run_dir} and {remedy}"

    def _report_late_skips(self) -> None:
        """A `warning` for image files that passed the up-front check but failed to decode (each
        replaced by the next image). Seen here when the data loads in this process (--workers 0);
        worker processes print a Python warning instead."""
        late = int(getattr(self.train_ds, "late_skipped", 0))
        if late > self.late_skips_reported:
            self.emit(
                "warning",
                self.step,
                message=f"{late - self.late_skips_reported} image read(s) from {self.cfg.data} "
                "failed to decode and were replaced by the next image",
                reason="unreadable",
            )
            self.late_skips_reported = late

    def rescue(self) -> bool:
        """After the data or the disk failed mid-run: save the progress since the last checkpoint
        if that can be done safely (one process, sound weights). Whether it was saved."""
        if self.d.distributed or self.step == 0 or self._saved_this_step() or self.consecutive_bad:
            return False  # a collective save could hang when only one rank failed
        try:
            self.save()
            return True
        except (TrainError, OSError, SafetensorError):
            return False

    def _saved_this_step(self) -> bool:
        return self.last_checkpoint is not None and self.last_checkpoint == checkpoint_dir(self.run_dir, self.step)

    def _finish(self, status: str, reason: str, save: bool = True) -> TrainResult:
        if save and not self._saved_this_step():
            self.save()
        self.emit_end(status, reason)
        return TrainResult(status, self.step, self.run_dir, reason, self.last_checkpoint)

    def emit_end(self, status: str, reason: str) -> None:
        self.emit(
            "end",
            self.step,
            status=status,
            reason=reason,
            checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
        )

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
        if self.lock_file is not None:
            self.lock_file.close()  # releases the lock
            self.lock_file = None


def _is_peer_failure(e: RuntimeError) -> bool:
    """A collective that failed because another rank died or hung (gloo/NCCL), not a bug here."""
    import torch.distributed as tdist

    if isinstance(e, getattr(tdist, "DistError", ())):
        return True
    return re.search(r"gloo|nccl|connection (reset|closed|refused)|peer|timed out", str(e), re.I) is not None


def train(
    cfg: TrainConfig,
    emit: Callable[[dict], None] | None = None,
    stop: StopLike = None,
    *,
    resume: bool = False,
    batch_hook: BatchHook | None = None,
) -> TrainResult:
    """Run (or with `resume`, continue) the training run `cfg` describes.

    `emit(event)` receives every event also written to `events.jsonl` (rank 0 only). `stop` (an
    Event or a callable) asks the run to finish its step, checkpoint and end "interrupted".
    `batch_hook(step, x, y) -> (x, y)` may alter a batch after augmentation (tests use it to
    inject non-finite values). Raises `SetupError` (exit 2) for bad settings, data or run
    directory and `TrainError` (exit 1) for failures before the first step; failures later
    end the run with status "failed" and are returned.
    """
    try:
        cfg.validate()
    except ConfigError as e:
        raise SetupError(str(e)) from None
    with contextlib.ExitStack() as stack:
        try:
            d = stack.enter_context(distributed(cfg.device))
        except DistError as e:
            raise SetupError(str(e)) from None
        trainer = _Trainer(cfg, d, emit, stop, resume, batch_hook)
        stack.callback(trainer.close)  # runs before the process group is left
        try:
            trainer.setup()
        except ConfigError as e:
            raise SetupError(str(e)) from None
        if d.is_main:
            trainer.sink = JsonlSink(trainer.run_dir / EVENTS_FILE)
        try:
            return trainer.run()
        except TrainError as e:
            trainer.emit_end("failed", str(e))
            return TrainResult("failed", trainer.step, trainer.run_dir, str(e), trainer.last_checkpoint)
        except (DataError, OSError, SafetensorError) as e:  # the data or the disk failed mid-run
            reason = f"{type(e).__name__}: {e}" if not isinstance(e, DataError) else str(e)
            saved = trainer.rescue()
            reason += f"; the weights at step {trainer.step} were saved" if saved else ""
            with contextlib.suppress(OSError):
                trainer.emit_end("failed", reason)
            return TrainResult("failed", trainer.step, trainer.run_dir, reason, trainer.last_checkpoint)
        except KeyboardInterrupt:
            trainer.emit_end(
                "interrupted",
                f"aborted at step {trainer.step}; its checkpoint was saved"
                if trainer._saved_this_step()
                else "aborted mid-step (no checkpoint saved)",
            )
            raise
        except RuntimeError as e:
            if not (d.distributed and _is_peer_failure(e)):
                trainer.emit_end("failed", f"{type(e).__name__}: {e}")
                raise
            first = re.sub(r"^\[[^]]*\] ", "", (str(e).strip().splitlines() or [""])[0])  # gloo's source location
            first = first.split(". ")[0][:160]
            last = trainer.last_checkpoint
            kept = f"the last checkpoint ({last.name}) is kept" if last is not None else "no checkpoint was saved"
            reason = (
                f"another process of the distributed run failed or lost its connection at step "
                f"{trainer.step} ({first}); {kept}"
            )
            with contextlib.suppress(OSError):
                trainer.emit_end("failed", reason)
            return TrainResult("failed", trainer.step, trainer.run_dir, reason, trainer.last_checkpoint)
        except BaseException as e:
            trainer.emit_end("failed", f"{type(e).__name__}: {e}")
            raise


__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainError",
    "SetupError",
    "train",
    "lr_at",
    "objective",
    "stop_on_signals",
    "load_run_config",
    "resumable_checkpoints",
    "dumps",
]
