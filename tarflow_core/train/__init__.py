"""Training: `train(cfg, emit=..., stop=...)` runs one TarFlow training run. No printing.

The run directory (`run_dir.py`) holds `config.json`, `events.jsonl` (one JSON event per line,
see `events.py`), `checkpoints/step-XXXXXXXX/` (native checkpoints + `train_state.pt`, see
`state.py`) and `samples/` (PNG grids of fixed noise and labels, see `previews.py`). Only rank 0
writes.

Where things are: `loop.py` the run (set-up, loop, finish) and `train()`; `parts.py` the data and
the model; `step.py` the optimisation step and its metrics; `schedule.py` the learning rate;
`checkpoints.py` saving; `report.py` the events; `outcome.py` how a run ends (which exception
ends it how); `signals.py` Ctrl-C handling.
"""

from ..config import TrainConfig
from ..events import dumps
from .loop import Trainer, train
from .outcome import SetupError, TrainError, TrainResult
from .parts import NOISE_SEED_OFFSET
from .previews import EVAL_SEED, SAMPLE_SEED_OFFSET, save_grid
from .run_dir import (
    CONFIG_FILE,
    LOCK_FILE,
    SAMPLES_DIR,
    TRAIN_STATE_FILE,
    checkpoint_dir,
    default_run_dir,
    load_run_config,
    resumable_checkpoints,
)
from .schedule import Schedule, lr_at
from .signals import StopLike, stop_on_signals
from .state import STATE_FORMAT, TrainState
from .step import BatchHook, objective

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
    "default_run_dir",
    "save_grid",
    "dumps",
    "Trainer",
    "TrainState",
    "Schedule",
    "StopLike",
    "BatchHook",
    "checkpoint_dir",
    "CONFIG_FILE",
    "LOCK_FILE",
    "SAMPLES_DIR",
    "TRAIN_STATE_FILE",
    "STATE_FORMAT",
    "EVAL_SEED",
    "SAMPLE_SEED_OFFSET",
    "NOISE_SEED_OFFSET",
]
