"""The run directory: its layout, the lock that keeps a second run out, the checks before a run
starts (a run already there, writable, disk space), `config.json`, and checkpoint pruning."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

from .. import __version__
from ..atomic import atomic_write_text
from ..checkpoint import CHECKPOINTS_DIR, MODEL_FILE, RESUME_STATE_FILE, list_checkpoints
from ..config import ModelConfig, TrainConfig
from ..dist import DistInfo, broadcast_object
from ..events import EVENTS_FILE
from .outcome import SetupError, TrainError
from .schedule import Schedule

TRAIN_STATE_FILE = RESUME_STATE_FILE
LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
SAMPLES_DIR = "samples"


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
        why = getattr(e, "strerror", None) or e
        raise SetupError(f"{path} is not a readable tarflow run config ({why})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), dict):
        raise SetupError(f"{path} is not a tarflow run config (it has no 'train' settings)")
    try:
        # runs of versions without the learned marginal map had none (today's default depends on the noise)
        return TrainConfig.from_dict({"marginal_bins": 0, **raw["train"]})
    except (ValueError, TypeError) as e:
        why = str(e) if isinstance(e, ValueError) else f"a setting has the wrong type: {e}"
        raise SetupError(f"{path} is not a valid tarflow run config ({why})") from None


class RunDir:
    """The run's directory, held (locked) by this run until `close()`. Only rank 0 touches the disk;
    every rank learns the path and whether the checks passed."""

    def __init__(self, path: Path, lock_file=None) -> None:
        self.path, self.lock_file = path, lock_file

    @classmethod
    def open(cls, cfg: TrainConfig, d: DistInfo, resume: bool) -> RunDir:
        """Check the directory suits a new run (or, with `resume`, holds one to continue), then lock it."""
        path = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
        if not cfg.run_dir:  # the time stamp must be rank 0's
            path = Path(broadcast_object(str(path), d))
        error, held = None, cls(path)
        if d.is_main:
            try:
                _check_use(path, resume)
                _probe_writable(path)
                held.lock_file = _lock(path)
            except SetupError as e:
                error = str(e)
        error = broadcast_object(error, d)
        if error:
            raise SetupError(error)
        return held

    def check_disk(self, num_parameters: int, with_ema: bool) -> None:
        """Refuse to start when the run directory's disk cannot hold two checkpoints."""
        per_ckpt = 4 * num_parameters * (1 + 2 + (1 if with_ema else 0)) + (1 << 20)
        free = shutil.disk_usage(self.path).free
        if free < 2 * per_ckpt:
            raise TrainError(
                f"not enough free disk space in {self.path}: {free / 2**20:.0f} MiB free, "
                f"about {2 * per_ckpt / 2**20:.0f} MiB needed for checkpoints"
            )

    def write_config(
        self,
        cfg: TrainConfig,
        model_cfg: ModelConfig,
        data_info: dict,
        world_size: int,
        steps_per_epoch: int,
        schedule: Schedule,
        environment: dict | None = None,
    ) -> None:
        """`config.json`: the run's settings (what `--resume` reads back), its architecture, data and
        schedule, and the environment its numbers depend on (`runtime.environment`)."""
        doc = {
            "format": "tarflow-run",
            "tarflow_version": __version__,
            "train": cfg.to_dict(),
            "model": model_cfg.to_dict(),
            "data": data_info,
            "noise": cfg.noise_spec,
            "world_size": world_size,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": schedule.total_steps,
            "warmup_steps": schedule.warmup_steps,
            "environment": environment,
        }
        atomic_write_text(self.path / CONFIG_FILE, json.dumps(doc, indent=2, default=str) + "\n")

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` resumable checkpoints (0: all); remove the older ones, also
        those a killed process left half-written or half-removed, and the temporary folders of
        saves that never finished (each as big as a checkpoint)."""
        done = resumable_checkpoints(self.path)
        oldest_kept = done[-keep][0] if keep and len(done) >= keep else (done[0][0] if done else None)
        for entry in (self.path / CHECKPOINTS_DIR).iterdir():
            m = re.fullmatch(r"step-(\d+)", entry.name)
            if m:
                stale = bool(keep) and oldest_kept is not None and int(m.group(1)) < oldest_kept
            else:  # `.step-N.XXXX.tmp` / `.step-N.old-PID`: this process has no save in flight now
                stale = re.fullmatch(r"\.step-\d+\..+", entry.name) is not None
            if stale and entry.is_dir():
                with contextlib.suppress(OSError):
                    (entry / TRAIN_STATE_FILE).unlink(missing_ok=True)  # not resumable first, then gone
                shutil.rmtree(entry, ignore_errors=True)

    def close(self) -> None:
        if self.lock_file is not None:
            self.lock_file.close()  # releases the lock
            self.lock_file = None


def _check_use(run_dir: Path, resume: bool) -> None:
    if resume:
        if not resumable_checkpoints(run_dir):
            raise SetupError(
                f"--resume {run_dir}: no complete checkpoint with {TRAIN_STATE_FILE} under {run_dir / CHECKPOINTS_DIR}"
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
        raise SetupError(f"--run-dir {run_dir} is a checkpoint directory ({MODEL_FILE}); choose another --run-dir")


def _lock(run_dir: Path):
    """Hold the run directory for this run: a second `train` on it (say `--resume` of a run that
    is still going) would interleave both runs' checkpoints and events. The open lock file, or
    None on a file system without locks."""
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
        return None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


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


def divergence_advice(run_dir: Path, saved: list[tuple[int, Path]], step: int, bad_steps: int) -> str:
    """After `bad_steps` non-finite steps up to `step`: what of the `saved` checkpoints is kept, and
    how to go on from it."""
    remedy = "a lower --lr or a --grad-clip"
    if not saved:
        return f"no checkpoint was saved: start again with {remedy}"
    kept, path = saved[-1]
    first_bad = step - bad_steps + 1
    if kept == first_bad - 1:  # its weights are the ones every later step failed on
        older = (
            f"remove {path} to resume from step {saved[-2][0]}"
            if len(saved) > 1
            else "no earlier checkpoint is left: start again"
        )
        return f"the newest checkpoint (step {kept}) holds the weights those steps failed on; {older} with {remedy}"
    return f"the last good checkpoint (step {kept}) is kept: resume with --resume {run_dir} and {remedy}"
