"""What a run says: its events (`events.py`), written to the run directory's `events.jsonl` by
rank 0 and handed to the caller's `emit`. The wording of the run's messages lives here."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import flow
from ..config import ConfigError, ModelConfig
from ..dist import DistInfo
from ..events import JsonlSink, make_event
from .outcome import TrainError
from .step import StepMetrics

if TYPE_CHECKING:
    from ..tensorboard import TensorBoardExport


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def peak_memory(device: torch.device) -> tuple[int, int | None]:
    """(the peak bytes this process has held, the device's total bytes where known)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory
    return int(memory_mb(device) * 2**20), None


def start_fields(t, version: str) -> dict[str, Any]:
    """The `start` event's fields for `Trainer` t: the settings, model, data, world, schedule, environment
    and how each process's batch is split into micro-batches."""
    cfg, data, micro = t.cfg, t.data, t.micro
    data_fields = {
        **data.info,
        "train": data.train.description,
        "test": data.test.description if data.test else None,
        "train_images": len(data.train),
        "skipped": int(getattr(data.train, "skipped", 0)),
    }
    return dict(
        config=cfg.to_dict(),
        model=t.model_cfg.to_dict(),
        parameters=t.model.num_parameters(),
        data=data_fields,
        world_size=t.d.world_size,
        device=str(t.d.device),
        precision=t.precision,
        global_batch=cfg.batch_size,
        steps_per_epoch=t.steps_per_epoch,
        total_steps=t.schedule.total_steps,
        warmup_steps=t.schedule.warmup_steps,
        run_dir=str(t.run_dir),
        resumed_from=str(t.resumed.checkpoint) if t.resumed else None,
        tarflow_version=version,
        environment=t.environment,
        micro_batch=micro.size,
        accumulation=micro.steps,
        checkpointing=cfg.checkpointing,
        memory_plan_bytes=micro.planned_peak,
        **({"micro_batch_note": micro.note} if micro.note else {}),
    )


class RunLog:
    """The run's events. Other ranks say nothing; rank 0 writes once `open()`ed."""

    def __init__(self, d: DistInfo, emit: Callable[[dict], None] | None) -> None:
        self.d, self.user_emit = d, emit
        self.sink: JsonlSink | None = None
        self.path: Path | None = None
        self.late_skips_reported = 0
        self.tensorboard: TensorBoardExport | None = None

    def open(self, path: Path, tensorboard: Path | None = None) -> None:
        """Write the events to `path` and, given a folder, as TensorBoard files there too (starting
        from the events already in the file: a resumed run's folder holds all of it)."""
        self.sink, self.path = JsonlSink(path), path
        if tensorboard is not None:
            from ..tensorboard import for_training

            try:
                self.tensorboard = for_training(path.parent, path, tensorboard)
            except OSError as e:  # before the first event: a bad setting, like an unwritable --run-dir
                raise ConfigError(f"--tensorboard: cannot write {tensorboard}: {e.strerror or e}") from None

    def emit(self, kind: str, step: int, **fields: Any) -> None:
        if not self.d.is_main:
            return
        event = make_event(kind, step, **fields)
        if self.sink is not None:
            try:
                self.sink(event)
            except OSError as e:  # e.g. a full disk: stop writing events, end the run
                self.sink = None
                raise TrainError(f"cannot write {self.path}: {e.strerror or e}") from None
        if self.tensorboard is not None:
            self._to_tensorboard(event)
        if self.user_emit is not None:
            self.user_emit(event)

    def _to_tensorboard(self, event: dict) -> None:
        """TensorBoard is one more reader of the events: its failure (a full disk) ends its files,
        told in a warning, not the run. Flushed on the rarer events; a timer flushes the rest."""
        try:
            self.tensorboard.write(event)
            if event["kind"] != "train":
                self.tensorboard.flush()
        except Exception as e:
            writer, self.tensorboard = self.tensorboard, None
            with contextlib.suppress(Exception):
                writer.close()
            self.warn(event["step"], f"TensorBoard files no longer written: {e}", reason="tensorboard")

    def warn(self, step: int, message: str, reason: str | None = None) -> None:
        self.emit("warning", step, message=message, **({"reason": reason} if reason else {}))

    def train(
        self, step: int, means: StepMetrics | None, *, lr: float, images_per_s: float, model_cfg: ModelConfig, **more
    ) -> None:
        """The `train` event of a log interval: the mean metrics over all ranks (NaN when every step
        was skipped), speed (forward + backward ~ 3x the forward's FLOPs) and memory; `more`: epoch, total_steps."""
        nan = float("nan")
        loss, nll, logdet, grad_norm = means if means is not None else (nan, nan, nan, nan)
        self.emit(
            "train",
            step,
            loss=loss,
            nll=nll,
            bpd=flow.nats_to_bpd(nll) if means is not None else nan,
            logdet=logdet,
            lr=lr,
            grad_norm=grad_norm,
            images_per_s=images_per_s,
            tflops=3 * model_cfg.flops_per_image() * images_per_s / 1e12,
            memory_mb=memory_mb(self.d.device),
            **more,
        )

    def nonfinite(self, step: int, in_a_row: int, skipped: int | None = None) -> None:
        """Non-finite steps were skipped: this one (counted on the host), or `skipped` in the interval
        (counted on the device)."""
        if skipped is None:
            message = f"non-finite loss or gradient at step {step}: step skipped ({in_a_row} in a row)"
            self.emit("warning", step, message=message, reason="nonfinite")
        else:
            what = f"{skipped} step(s) with non-finite loss or gradient skipped"
            message = f"{what} ({in_a_row} in a row at step {step})"
            self.emit("warning", step, reason="nonfinite", message=message)

    def late_skips(self, step: int, dataset, source: str | None) -> None:
        """A `warning` for image files that passed the up-front check but failed to decode (each
        replaced by the next image). Seen here when the data loads in this process (--workers 0);
        worker processes print a Python warning instead."""
        late = int(getattr(dataset, "late_skipped", 0))
        if late > self.late_skips_reported:
            self.warn(
                step,
                f"{late - self.late_skips_reported} image read(s) from {source} "
                "failed to decode and were replaced by the next image",
                reason="unreadable",
            )
            self.late_skips_reported = late

    def end(self, step: int, status: str, reason: str, checkpoint: Path | None) -> None:
        self.emit("end", step, status=status, reason=reason, checkpoint=str(checkpoint) if checkpoint else None)

    def close(self) -> None:
        if self.tensorboard is not None:
            with contextlib.suppress(Exception):  # closing flushes: the files lose their last points at worst
                self.tensorboard.close()
            self.tensorboard = None
        if self.sink is not None:
            self.sink.close()
