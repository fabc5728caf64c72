"""The run: `train(cfg, emit=..., stop=...)` sets one training run up, loops over the data and
finishes it. No printing: everything the run has to say is an event (`report.py`).

Exactness: the data order comes from (seed, epoch) and the augmentation noise from one
generator replicated on every rank (each rank takes its share of the global batch's draw), so
a resumed run continues bit-exactly on CPU and N processes see the same global batch as one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import __version__
from ..config import ConfigError, TrainConfig
from ..data import DataError, make_loader
from ..dequant import DequantizingFlow
from ..dist import DistInfo, any_flag, distributed
from ..events import EVENTS_FILE, stopped
from ..runtime import busy_note, environment, tf32_restored, threads_for, use_tf32
from ..tensorboard import TENSORBOARD_DIR, TensorBoardMissing, require_tensorboard
from .checkpoints import Checkpointer
from .micro import micro_batch_for, probe_step
from .outcome import SetupError, TrainResult, classify_failure, out_of_memory_reason, peer_failure_reason
from .parts import build_model, open_data, wrap_model
from .previews import Previews
from .report import RunLog, peak_memory, start_fields
from .run_dir import RunDir, divergence_advice, resumable_checkpoints
from .schedule import Schedule
from .signals import StopLike, stop_reason
from .state import Resumed, recorded_threads, resume, resume_warnings
from .step import BatchHook, MetricSums, Stepper


class Trainer:
    """One run. `train()` builds it, calls `setup()` then `run()`, and always `close()`s it."""

    def __init__(
        self, cfg: TrainConfig, d: DistInfo, emit, stop: StopLike, resume: bool, batch_hook: BatchHook | None
    ) -> None:
        self.cfg, self.d, self.stop, self.resume, self.batch_hook = cfg, d, stop, resume, batch_hook
        self.log = RunLog(d, emit)
        self.dir: RunDir | None = None
        self.step = 0
        self.consecutive_bad = 0  # non-finite steps in a row, up to the last one counted
        self.resumed: Resumed | None = None
        self.notes: list[tuple[str, str]] = []  # (reason, message): warnings told at the start
        self.checkpoints: Checkpointer | None = None
        self.threads = torch.get_num_threads()  # the CPU threads in use (train() has set them)

    @property
    def run_dir(self) -> Path:
        return self.dir.path

    @property
    def last_checkpoint(self) -> Path | None:
        return self.checkpoints.last if self.checkpoints is not None else None

    # --------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Open the data and the run directory, build the model, load the checkpoint when resuming."""
        d = self.d
        self.data = open_data(self.cfg, d)
        self.cfg = cfg = self.data.cfg  # its data path made absolute
        self.model_cfg = self.data.model_cfg
        self.dir = RunDir.open(cfg, d, self.resume)
        local_batch = cfg.batch_size // d.world_size
        try:
            self.loader = make_loader(
                self.data.train, local_batch, cfg.seed, d.rank, d.world_size, cfg.workers, d.device, drop_last=True
            )
        except DataError as e:
            raise SetupError(str(e)) from None
        self.steps_per_epoch = len(self.loader)
        self.schedule = Schedule.for_run(cfg, self.steps_per_epoch)
        built = build_model(cfg, self.model_cfg, d)
        self.model, self.ema = built.model, built.ema
        if self.resume:
            self._resume(built)
        self.precision = cfg.resolved_precision(d.device.type)
        autocast_dtype = torch.bfloat16 if self.precision == "bf16" else None
        self.micro = micro_batch_for(
            cfg, self.model_cfg, d, self.precision, lambda size: probe_step(self.model, size, autocast_dtype)
        )
        # float32 products on TF32 tensor cores (CUDA only: CPU results stay bit-exact), recorded with the run
        self.environment = {**environment(d.device, self.threads, self.precision), "tf32": use_tf32(d.device)}
        if self.resume:
            self.notes = resume_warnings(
                self.resumed, cfg, d, self.steps_per_epoch, self.schedule.total_steps, self.environment
            )
        optimizer, noise_gen = built.optimizer, built.noise_gen
        # variational dequantization: q runs inside the wrapped forward, so DDP sees its parameters used
        trained = self.model if self.model.dequantizer is None else DequantizingFlow(self.model)
        wrapped = wrap_model(trained, cfg, d)
        self.stepper = Stepper(
            cfg=cfg,
            model_cfg=self.model_cfg,
            d=d,
            model=self.model,
            forward=wrapped.forward,
            optimizer=optimizer,
            ema=self.ema,
            noise_gen=noise_gen,
            schedule=self.schedule,
            fused=built.fused,
            autocast_dtype=autocast_dtype,
            batch_hook=self.batch_hook,
            micro_batch=self.micro.size if self.micro.steps > 1 else None,
            no_sync=wrapped.no_sync,
        )
        self.previews = Previews(cfg, self.model_cfg, d, self.data.test, eval_batch=max(1, min(256, local_batch * 2)))
        self.checkpoints = Checkpointer(
            run_dir=self.dir,
            d=d,
            log=self.log,
            cfg=cfg,
            data_info=self.data.info,
            precision=self.precision,
            steps_per_epoch=self.steps_per_epoch,
            schedule=self.schedule,
            environment=self.environment,
            model=self.model,
            optimizer=optimizer,
            loader=self.loader,
            noise_gen=noise_gen,
            ema=self.ema,
            last=self.resumed.checkpoint if self.resumed else None,  # the state now: finishing at once needs no save
        )
        if d.is_main:
            self.dir.check_disk(self.model.num_parameters(), self.ema is not None)

    def _resume(self, built) -> None:
        found = resumable_checkpoints(self.run_dir)
        parts = dict(model=self.model, optimizer=built.optimizer, loader=self.loader, noise_gen=built.noise_gen)
        self.resumed = resume(self.run_dir, found, self.cfg, ema=self.ema, **parts)
        self.ema = self.resumed.ema
        self.step, self.consecutive_bad = int(self.resumed.state.step), int(self.resumed.state.bad_steps)

    # ---------------------------------------------------------------------------------- run
    def run(self) -> TrainResult:
        if self.d.is_main:
            self.dir.write_config(
                self.cfg,
                self.model_cfg,
                self.data.info,
                self.d.world_size,
                self.steps_per_epoch,
                self.schedule,
                self.environment,
            )
        self._announce()
        self.sums = MetricSums(self.d.device, self.consecutive_bad)
        self.model.train()
        self._new_interval()
        if self.step >= self.schedule.total_steps:
            return self._finish("finished", f"already at step {self.step} of {self.schedule.total_steps}")
        while True:
            for x_u8, y in self.loader:
                ok, metrics, self.lr = self.stepper(self.step, x_u8, y)
                self.sums.add(metrics, ok)
                self.step += 1
                ended = self._after_step(ok)
                if ended is not None:
                    return ended

    def _after_step(self, ok: torch.Tensor) -> TrainResult | None:
        """Log, evaluate, sample, checkpoint and stop as due after a step; the result once the run ends."""
        cfg, total = self.cfg, self.schedule.total_steps
        if not self.stepper.fused:  # else counted on the device, read at log intervals
            good = bool(ok)
            self.consecutive_bad = 0 if good else self.consecutive_bad + 1
            if not good:
                self.log.nonfinite(self.step, self.consecutive_bad)
        last = self.step >= total
        if self.step % self._log_every == 0 or last:
            self._end_interval()
        if self.consecutive_bad >= cfg.max_bad_steps:
            saved = resumable_checkpoints(self.run_dir) if self.d.is_main else []  # rank 0 knows the disk
            advice = divergence_advice(self.run_dir, saved, self.step, self.consecutive_bad)
            reason = (
                f"{self.consecutive_bad} consecutive steps had non-finite loss or gradients "
                f"(last at step {self.step}); {advice}"
            )
            return self._finish("failed", reason, save=False)
        t0 = time.perf_counter()
        # the checkpoint first: a preview or an evaluation that fails must not cost the step's weights
        if last or (self._due(cfg.checkpoint_every) and self.consecutive_bad == 0):
            self.save()  # not inside a run of skipped steps: older checkpoints must survive it
        if self._due(cfg.eval_every) or (last and cfg.eval_every):
            _side_job(self, "evaluation", self._evaluate)
        if self._due(cfg.sample_every) or (last and cfg.sample_every):
            _side_job(self, "sample grid", self._sample)
        if last:
            return self._finish("finished", f"reached step {total}")
        self.side_time += time.perf_counter() - t0
        if self._stop_requested():
            if self.step > self.steps_mark:  # the partial interval's numbers, so even a short run has some
                self._log_train()
            return self._finish("interrupted", stop_reason(self.stop))
        return None

    def _due(self, every: int) -> bool:
        return bool(every) and self.step % every == 0

    @property
    def _log_every(self) -> int:
        return self.cfg.log_every or max(1, self.schedule.total_steps // 100)

    def _stop_requested(self) -> bool:
        """Whether to stop; in a distributed run all ranks agree (one collective every few steps)."""
        want_stop = stopped(self.stop)
        if self.d.distributed:
            stop_every = max(1, min(self.cfg.log_every or 10, 10))
            want_stop = any_flag(want_stop, self.d) if self.step % stop_every == 0 else False
        return want_stop

    def _new_interval(self) -> None:
        # time spent on evaluation, samples and checkpoints is left out of the images/s
        self.t_mark, self.steps_mark, self.side_time = time.perf_counter(), self.step, 0.0

    def _end_interval(self) -> None:
        """At a log interval's end: (fused) the non-finite steps counted on the device, the `train`
        event, the images that failed to decode."""
        if self.stepper.fused:
            bad_now, run_now = int(self.sums.bad_in_interval.item()), int(self.sums.bad_run.item())
            self.consecutive_bad = run_now
            if bad_now:
                self.log.nonfinite(self.step, run_now, skipped=bad_now)
        self._log_train()
        self.log.late_skips(self.step, self.data.train, self.cfg.data)
        self._new_interval()

    def _log_train(self) -> None:
        elapsed = time.perf_counter() - self.t_mark - self.side_time
        means = self.sums.take(self.d)
        ips = self.cfg.batch_size * (self.step - self.steps_mark) / max(elapsed, 1e-9)
        epoch, total = self.step / self.steps_per_epoch, self.schedule.total_steps
        self.log.train(
            self.step, means, lr=self.lr, images_per_s=ips, model_cfg=self.model_cfg, epoch=epoch, total_steps=total
        )

    def _evaluate(self) -> None:
        fields = self.previews.evaluate(self.model, self.ema)
        if fields is not None:
            self.log.emit("eval", self.step, **fields)

    def _sample(self) -> None:
        if self.d.is_main:
            fields = self.previews.sample(self.model, self.ema, self.run_dir, self.step, self.stepper.autocast_dtype)
            self.log.emit("sample", self.step, **fields)

    def save(self) -> Path:
        return self.checkpoints.save(self.step, self.consecutive_bad)

    # --------------------------------------------------------------------------- start, end
    def _announce(self) -> None:
        """The `start` event, then the warnings known before the first step."""
        cfg, data = self.cfg, self.data
        self.log.emit("start", self.step, **start_fields(self, __version__))
        busy = busy_note(self.threads, self.d.device.type)
        if busy:
            self.log.warn(self.step, busy, reason="busy")
        if data.train.skipped:
            n = data.train.skipped
            self.log.warn(self.step, f"{n} unreadable file{'' if n == 1 else 's'} skipped in {cfg.data}")
        if data.test_note:
            self.log.warn(self.step, data.test_note)
        for reason, message in self.notes:
            self.log.warn(self.step, message, reason=reason)

    def _finish(self, status: str, reason: str, save: bool = True) -> TrainResult:
        if save and not self.checkpoints.saved_at(self.step):
            self.save()
        self.log.end(self.step, status, reason, self.last_checkpoint)
        return self.result(status, reason)

    def result(self, status: str, reason: str) -> TrainResult:
        return TrainResult(status, self.step, self.run_dir, reason, self.last_checkpoint)

    def close(self) -> None:
        self.log.close()
        if self.dir is not None:
            self.dir.close()


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
    with contextlib.ExitStack() as stack:
        try:
            cfg.validate()
            if cfg.tensorboard:
                _require_tensorboard()
            d = stack.enter_context(distributed(cfg.device))
            stack.enter_context(threads_for(_threads(cfg, d, resume)))
            stack.enter_context(tf32_restored())
            trainer = Trainer(cfg, d, emit, stop, resume, batch_hook)
            stack.callback(trainer.close)  # runs before the process group is left
            trainer.setup()
            if d.is_main:
                tensorboard = trainer.run_dir / TENSORBOARD_DIR if cfg.tensorboard else None
                trainer.log.open(trainer.run_dir / EVENTS_FILE, tensorboard=tensorboard)
        except BaseException as e:
            if classify_failure(e, started=False, distributed=False) == "setup":
                raise SetupError(str(e)) from None
            raise
        try:
            return trainer.run()
        except BaseException as e:
            result = _end_after(trainer, e, classify_failure(e, started=True, distributed=d.distributed))
            if result is None:
                raise
            return result


def _side_job(trainer: Trainer, what: str, job: Callable[[], None]) -> None:
    """An evaluation or a sample grid; running out of memory there is a warning, and the run goes on."""
    try:
        job()
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
        if classify_failure(e, started=True, distributed=trainer.d.distributed) != "oom":
            raise
        if trainer.d.device.type == "cuda":
            torch.cuda.empty_cache()
        step = trainer.step
        trainer.log.warn(step, f"out of memory in the {what} at step {step}: skipped, the run goes on", "oom")


def _require_tensorboard() -> None:
    """--tensorboard without the package: a bad setting, told before anything starts."""
    try:
        require_tensorboard()
    except TensorBoardMissing as e:
        raise ConfigError(f"--tensorboard: {e}") from None


def _threads(cfg: TrainConfig, d: DistInfo, resume: bool) -> int | None:
    """The CPU threads to compute with: --threads; else, resuming, the count the checkpoint was
    computed with (the result depends on it); else torch's own count. torchrun's processes keep the
    launcher's count unless --threads is given."""
    if cfg.threads is not None or not resume or d.distributed:
        return cfg.threads
    return recorded_threads(cfg.run_dir)


def _end_after(trainer: Trainer, e: BaseException, how: str) -> TrainResult | None:
    """End the run the way `classify_failure` decided: its result, or None where `e` must go on."""
    log, step, checkpoints = trainer.log, trainer.step, trainer.checkpoints
    if how == "failed":
        log.end(step, "failed", str(e), trainer.last_checkpoint)
        return trainer.result("failed", str(e))
    if how == "oom":  # the weights may be half-updated: nothing is saved, the last checkpoint stays
        micro, device = trainer.micro, trainer.d.device
        reason = out_of_memory_reason(
            step, device, peak_memory(device), micro.planned_peak, micro.size, trainer.cfg.checkpointing,
            trainer.last_checkpoint,
        )  # fmt: skip
        log.end(step, "failed", reason, trainer.last_checkpoint)
        return trainer.result("failed", reason)
    if how == "interrupted":
        saved = checkpoints.saved_at(step)
        why = "aborted mid-step (no checkpoint saved)"
        if saved:
            why = f"aborted at step {step}; its checkpoint was saved"
        log.end(step, "interrupted", why, trainer.last_checkpoint)
        return None
    if how == "crash":
        log.end(step, "failed", f"{type(e).__name__}: {e}", trainer.last_checkpoint)
        return None
    if how == "io":  # the data or the disk failed mid-run
        reason = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
        reason += (
            f"; the weights at step {step} were saved" if checkpoints.rescue(step, trainer.consecutive_bad) else ""
        )
    else:  # "peer"
        reason = peer_failure_reason(e, step, trainer.last_checkpoint)
    with contextlib.suppress(OSError):  # the disk may be what failed
        log.end(step, "failed", reason, trainer.last_checkpoint)
    return trainer.result("failed", reason)
