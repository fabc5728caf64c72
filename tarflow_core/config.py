"""Typed settings. `ModelConfig` (model_config.py, re-exported here) fully describes a TarFlow
network; it is saved in every checkpoint. `TrainConfig` is one training run, all of it: each field is
declared once with `option(...)` (default, help, command-line flags, check, whether `--resume` may
change it), and `tarflow train`, validation and the resume rule are built from those declarations.
The named presets are in `presets.py`.

The architecture fields of both share names (`in_channels`, `img_size`, `num_blocks`: the published
code's `Model(...)` arguments); a `TrainConfig` shows them as `--channels`, `--image-size`, `--blocks`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .model_config import DEQUANT_TYPES, ModelConfig, dataclass_from_dict

__all__ = ["DEQUANT_TYPES", "ModelConfig", "TrainConfig", "ConfigError", "dataclass_from_dict"]

# ------------------------------------------------------------------------------ training options


class ConfigError(ValueError):
    """A training setting that cannot work; the message names the option and what was expected."""


NOISE_TYPES = ("gaussian", "uniform", "variational")
PRECISIONS = ("auto", "fp32", "bf16")
DECAY_PARAMS = ("all", "matrices")
CHECKPOINTING = ("off", "blocks", "layers")
Check = Callable[[str, Any], "str | None"]  # (flag, value) -> the problem, or None when fine


@dataclass(frozen=True)
class OptionSpec:
    """How a `TrainConfig` field appears to the user: its help text, its command-line flags (the first
    long one names it in messages), its check, and whether `--resume` may change it."""

    help: str
    flags: tuple[str, ...]
    check: Check | None = None
    resume: bool = False  # may change when a run is resumed
    cli: bool = True  # False: no option of its own (`tarflow train` sets it some other way)
    path: bool = False  # the option takes a path (shown as such in --help)

    @property
    def flag(self) -> str:
        """The option's name in messages: `--flip` for `--flip/--no-flip`."""
        return next(f for f in self.flags if f.startswith("--")).split("/")[0]


def option(
    default: Any,
    help: str,  # noqa: A002
    *flags: str,
    check: Check | None = None,
    resume: bool = False,
    **kw: Any,
) -> Any:
    """Declare a training option once: its default, help, flags (default `--field-name`), check and
    whether `--resume` may change it. Validation, the resume rule and the CLI all read this."""
    return field(default=default, metadata={"option": OptionSpec(help, flags, check, resume, **kw)})


def option_spec(f: dataclasses.Field) -> OptionSpec:
    spec = f.metadata["option"]
    return spec if spec.flags else dataclasses.replace(spec, flags=("--" + f.name.replace("_", "-"),))


# Checks: each returns the problem as the user should read it, or None.
def positive_int(flag: str, v: Any) -> str | None:
    return f"{flag} must be a positive integer (got {v})" if v is not None and v < 1 else None


def at_least_zero(flag: str, v: Any) -> str | None:
    return f"{flag} must be >= 0 (got {v})" if v is not None and v < 0 else None


def in_unit_interval(flag: str, v: Any) -> str | None:
    return None if 0 <= v < 1 else f"{flag} must be in [0, 1) (got {v})"


def _channels(flag: str, v: Any) -> str | None:
    return f"{flag} must be 1 or 3 (got {v})" if v is not None and v not in (1, 3) else None


def _noise(flag: str, v: Any) -> str | None:
    return None if v in NOISE_TYPES else f"{flag} must be 'uniform', 'variational' or 'gaussian:STD' (got {v!r})"


def _one_of(choices: tuple[str, ...]) -> Check:
    return lambda flag, v: None if v in choices else f"{flag} must be one of {', '.join(choices)} (got {v!r})"


def _micro_batch(flag: str, v: Any) -> str | None:
    ok = v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
    return None if ok else f"{flag} must be a positive integer or 'auto' (got {v!r})"


def _lr(flag: str, v: Any) -> str | None:
    return None if v > 0 and math.isfinite(v) else f"{flag} must be positive (got {v})"


def _ema(flag: str, v: Any) -> str | None:
    return f"{flag} must be a decay in [0, 1), e.g. 0.9999 (got {v})" if v is not None and not 0 <= v < 1 else None


def _positive(flag: str, v: Any) -> str | None:
    return None if v > 0 and math.isfinite(v) else f"{flag} must be positive (got {v})"


def _block_layers(flag: str, v: Any) -> str | None:
    if v is None or (isinstance(v, tuple) and v and all(isinstance(n, int) and n >= 1 for n in v)):
        return None
    return f"{flag} must be positive layer counts, one per block, e.g. 1,1,1,5 (got {v!r})"


def _epochs(flag: str, v: Any) -> str | None:
    return f"{flag} must be positive (got {v})" if v is not None and not v > 0 else None


@dataclass(frozen=True)
class TrainConfig:
    """One training run, all of it. `None` means "decide from the data / the run".

    Each field is one option of `tarflow train` (see `option`); the architecture fields carry
    `ModelConfig`'s names (`in_channels`, `img_size`, `num_blocks`) and the CLI's flags."""

    # data; `preset` is the name of the preset the run started from (`--preset` picks it)
    data: str | None = option(
        "digits",
        "Training data: 'digits' (embedded), an image folder, .npz/.npy, MNIST IDX files or CIFAR batches.",
        "--data",
        "-d",
    )
    preset: str = option("tiny", "Name of the preset the run started from.", cli=False)
    img_size: int | None = option(
        None, "Image size in pixels (default: read off the data).", "--image-size", check=positive_int
    )
    in_channels: int | None = option(
        None, "Channels, 1 or 3 (default: read off the data).", "--channels", check=_channels
    )
    flip: bool = option(False, "Random horizontal flips.", "--flip/--no-flip")
    # architecture (ModelConfig fields; shape and classes come from the data)
    patch_size: int = option(2, "Patch size p (tokens are p x p patches).", check=positive_int)
    width: int = option(64, "Transformer width.", check=positive_int)
    num_blocks: int = option(4, "Number of flow blocks.", "--blocks", check=positive_int)
    layers_per_block: int = option(1, "Transformer layers per flow block.", check=positive_int)
    block_layers: tuple[int, ...] | None = option(
        None,
        "Layers of each flow block, comma-separated, from the data side to the noise side, e.g. 1,1,1,5 "
        "(deep-shallow: most layers in the block nearest the noise); overrides --layers-per-block.",
        check=_block_layers,
    )
    head_dim: int = option(32, "Attention head size.", check=positive_int)
    expansion: int = option(4, "MLP hidden size as a multiple of the width.", check=positive_int)
    nvp: bool = option(True, "Affine (--nvp) or shift-only volume-preserving (--vp) flow.", "--nvp/--vp")
    conditional: bool | None = option(  # None: conditional when the data has labels
        None, "Class conditioning (default: when the data has labels).", "--conditional/--unconditional"
    )
    label_drop: float = option(0.1, "Fraction of labels dropped (conditional runs).", check=in_unit_interval)
    # noise augmentation: one `--noise uniform|gaussian:STD` option sets both fields
    noise: str = option(
        "gaussian",
        "'uniform' (dequantization, likelihood runs), 'variational' (dequantization by a learned q(u|x)) "
        "or 'gaussian:STD'.",
        "--noise",
        check=_noise,
        cli=False,
    )
    noise_std: float = option(0.1, "The Gaussian noise std (the STD of --noise gaussian:STD).", "--noise", cli=False)
    marginal_bins: int | None = option(  # None: by the noise, as measured (docs/quality.md)
        None,
        "Learn a monotone piecewise-linear map of each pixel value (per channel, this many equal bins over "
        "[-1, 1], 256 = the 8-bit levels) before the transformer blocks; 0: none (default: 256 for likelihood "
        "runs, --noise uniform or variational; 0 with Gaussian noise).",
        check=at_least_zero,
    )
    dequant_width: int = option(
        16, "Channels of the variational dequantizer q(u|x) (with --noise variational).", check=positive_int
    )
    dequant_layers: int = option(
        4, "Coupling layers of the variational dequantizer q(u|x) (with --noise variational).", check=positive_int
    )
    # optimisation
    batch_size: int = option(  # global: per-process batch x world size
        64, "Global batch size (per process x processes).", "--batch-size", "-b", check=positive_int
    )
    lr: float = option(2e-3, "Peak learning rate.", check=_lr, resume=True)
    min_lr: float = option(  # checked against lr in validate()
        1e-6, "Learning rate at the start of warm-up and the end of the cosine.", resume=True
    )
    warmup_steps: int | None = option(None, "Linear warm-up steps (default: one epoch).", check=at_least_zero)
    weight_decay: float = option(1e-4, "AdamW weight decay.", check=at_least_zero)
    decay_params: str = option(
        "all",
        "Which parameters weight decay applies to: all (the published recipe) or matrices (not norms, "
        "biases, embeddings).",
        "--weight-decay-on",
        check=_one_of(DECAY_PARAMS),
    )
    adam_eps: float = option(1e-8, "AdamW epsilon.", check=_positive)
    beta1: float = option(0.9, "AdamW beta1.", check=in_unit_interval)
    beta2: float = option(0.95, "AdamW beta2.", check=in_unit_interval)
    grad_clip: float | None = option(  # max global grad norm; None/0: off
        None, "Clip the global gradient norm (0: off).", check=at_least_zero, resume=True
    )
    ema: float | None = option(None, "EMA decay of the weights, e.g. 0.9999 (0: off).", check=_ema)  # None/0: off
    ema_warmup: int | None = option(  # None: the (1 + n) / (10 + n) ramp of earlier versions
        None,
        "Steps over which the EMA's averaging window grows to its full length 1 / (1 - decay) "
        "(default: the decay ramps as (1 + n) / (10 + n)).",
        check=positive_int,
    )
    zero_init_residual: bool = option(
        False,
        "Start every attention and MLP branch at zero (their output projections zero-initialised).",
        "--zero-init/--no-zero-init",
    )
    # length: max_steps wins when both are given
    max_steps: int | None = option(1500, "Run length in steps.", check=positive_int, resume=True)
    epochs: float | None = option(
        None, "Run length in epochs (used when --max-steps is not given).", check=_epochs, resume=True
    )
    # numerics
    precision: str = option(  # auto: bf16 on CUDA for Gaussian-noise runs, else fp32
        "auto", "fp32, bf16 or auto (bf16 on CUDA for Gaussian-noise runs).", check=_one_of(PRECISIONS), resume=True
    )
    compile: bool = option(False, "torch.compile the model.", "--compile/--no-compile", resume=True)
    # memory: both leave the maths as it is (the same gradients), so --resume may change them
    micro_batch: int | str | None = option(  # None: the whole per-process batch
        None,
        "Images per forward/backward pass: each process's share of --batch-size is split into micro-batches "
        "whose gradients add up to the whole batch's (auto: the largest the memory plan fits, on CUDA; "
        "default: no split). May change on --resume.",
        check=_micro_batch,
        resume=True,
    )
    checkpointing: str = option(
        "off",
        "Activation checkpointing: off, blocks or layers (recomputed in backward: less memory, the same "
        "gradients, about a third more compute). May change on --resume.",
        check=_one_of(CHECKPOINTING),
        resume=True,
    )
    # intervals, in steps (0: never, except the final checkpoint; log_every 0: about 100 lines per run)
    sample_every: int = option(250, "Steps between sample grids (0: never).", check=at_least_zero, resume=True)
    eval_every: int = option(
        250, "Steps between held-out bpd evaluations (0: never).", check=at_least_zero, resume=True
    )
    checkpoint_every: int = option(
        500, "Steps between checkpoints (0: only at the end).", check=at_least_zero, resume=True
    )
    log_every: int = option(
        25, "Steps between training log lines (0: about 100 per run).", check=at_least_zero, resume=True
    )
    keep_checkpoints: int = option(3, "Newest checkpoints kept (0: keep all).", check=at_least_zero, resume=True)
    max_bad_steps: int = option(
        5, "Consecutive non-finite steps before the run stops.", check=positive_int, resume=True
    )
    num_samples: int = option(100, "Images in each sample grid.", check=positive_int, resume=True)
    eval_images: int | None = option(  # None: the whole split
        2000, "Held-out images per evaluation.", check=positive_int, resume=True
    )
    # run control
    workers: int = option(0, "Data loader worker processes.", check=at_least_zero, resume=True)
    # the order of floating-point reductions depends on it, so it is a recorded setting (runtime.py);
    # None: torch's own count, which a single-process run then records
    threads: int | None = option(
        None,
        "CPU threads torch computes with (default: torch's own count, e.g. OMP_NUM_THREADS); recorded with "
        "the run, as results depend on it.",
        check=positive_int,
        resume=True,
    )
    # one more reader of the events, fed by rank 0 as they are emitted (tarflow_core/tensorboard.py)
    tensorboard: bool = option(
        False,
        "Also write the scalars and sample grids as TensorBoard files into RUN_DIR/tensorboard/ as the run "
        "goes (needs the tensorboard package, as the extra of that name installs; for a finished run: tarflow "
        "export-tb).",
        "--tensorboard/--no-tensorboard",
        resume=True,
    )
    seed: int = option(0, "Random seed (model init, data order, noise).")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps.", resume=True)
    run_dir: str | None = option(None, "Run directory (default: runs/<preset>-<time>).", path=True)

    def __post_init__(self) -> None:
        if isinstance(self.block_layers, list):  # as read back from config.json
            object.__setattr__(self, "block_layers", tuple(self.block_layers))
        self.validate()

    # ------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Each option's own check (declared with it), then the checks that involve two options."""
        problems = []
        for f in dataclasses.fields(self):
            spec = option_spec(f)
            if spec.check is not None and (problem := spec.check(spec.flag, getattr(self, f.name))):
                problems.append(problem)
        problems += problems_between_options(self)
        if problems:
            raise ConfigError("; ".join(problems))

    # ---------------------------------------------------------------------------- helpers
    @property
    def noise_spec(self) -> dict[str, Any]:
        """The checkpoint's `noise` entry: {"type", "std"}."""
        if self.noise in ("uniform", "variational"):
            return {"type": self.noise, "std": None}
        return {"type": "gaussian", "std": self.noise_std}

    @property
    def noise_label(self) -> str:
        return self.noise if self.noise in ("uniform", "variational") else f"gaussian:{self.noise_std:g}"

    @property
    def resolved_marginal_bins(self) -> int:
        """As given, else 256 for likelihood runs (measured to win there) and 0 with Gaussian noise."""
        if self.marginal_bins is not None:
            return self.marginal_bins
        return 0 if self.noise == "gaussian" else 256

    @property
    def grad_clip_value(self) -> float | None:
        return self.grad_clip if self.grad_clip else None

    @property
    def ema_decay(self) -> float | None:
        return self.ema if self.ema else None

    def model_config(self, in_channels: int, img_size: int, num_classes: int) -> ModelConfig:
        """The architecture for data of this shape (`num_classes` 0: unconditional)."""
        conditional = num_classes > 0 if self.conditional is None else self.conditional
        if conditional and num_classes == 0:
            raise ConfigError(f"--conditional needs labelled data, but {self.data} has no labels")
        if img_size % self.patch_size:  # the size may come from the data, so validate() cannot see it
            sizes = f"image size {img_size} (--image-size)"
            raise ConfigError(f"{sizes} is not a multiple of patch size {self.patch_size} (--patch-size)")
        # the architecture fields have ModelConfig's names; the shape and classes come from the data
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig) if hasattr(self, f.name)}
        shared.update(in_channels=in_channels, img_size=img_size, num_classes=num_classes if conditional else 0)
        shared["dequant"] = "variational" if self.noise == "variational" else "uniform"
        shared["marginal_bins"] = self.resolved_marginal_bins
        try:
            return ModelConfig(**shared)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def resolved_precision(self, device_type: str) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if device_type == "cuda" and self.noise == "gaussian" else "fp32"

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes` applied (`None` values are ignored: "not given")."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From `to_dict()`'s output, also as written before the architecture fields took
        `ModelConfig`'s names (run directories of older versions still resume)."""
        d = {OLD_NAMES.get(k, k): v for k, v in d.items()}
        return dataclass_from_dict(cls, d, ConfigError, "training settings")


def problems_between_options(c: TrainConfig) -> list[str]:
    """What is wrong with how two options go together (each option's own check is declared with it)."""
    problems = []
    if c.noise == "gaussian" and not (c.noise_std > 0 and math.isfinite(c.noise_std)):
        problems.append(f"--noise gaussian:STD needs a positive STD (got {c.noise_std})")
    if c.lr > 0 and not 0 <= c.min_lr <= c.lr:
        problems.append(f"--min-lr must be between 0 and --lr (got {c.min_lr})")
    if c.max_steps is None and c.epochs is None:
        problems.append("give the run a length: --max-steps or --epochs")
    if c.width % c.head_dim if c.width and c.head_dim else False:
        problems.append(f"--width {c.width} must be a multiple of --head-dim {c.head_dim}")
    if c.block_layers is not None and len(c.block_layers) != c.num_blocks:
        problems.append(f"--block-layers gives {len(c.block_layers)} blocks but --blocks is {c.num_blocks}")
    if c.img_size is not None and c.patch_size and c.img_size % c.patch_size:
        problems.append(f"--image-size {c.img_size} must be a multiple of --patch-size {c.patch_size}")
    return problems


# `TrainConfig` keys of run directories written before the rename -> today's names
OLD_NAMES = {"channels": "in_channels", "image_size": "img_size", "blocks": "num_blocks"}
# The settings `--resume` may change (the rest would change the model or the data order). The learning
# rate and clipping may change too: the remedy when a run stopped on non-finite steps.
RESUME_CHANGEABLE = frozenset(f.name for f in dataclasses.fields(TrainConfig) if option_spec(f).resume)


def flag(name: str) -> str:
    """The command-line name of `TrainConfig` field `name` (`num_blocks` -> `--blocks`)."""
    return option_spec(next(f for f in dataclasses.fields(TrainConfig) if f.name == name)).flag


def parse_noise(text: str) -> tuple[str, float | None]:
    """`uniform` or `gaussian:STD` (also `gaussian=STD`, or a bare number) -> (type, std)."""
    t = text.strip().lower()
    if t in ("uniform", "variational"):
        return t, None
    for sep in (":", "="):
        if t.startswith("gaussian" + sep):
            t = t[len("gaussian") + 1 :]
            break
    try:
        std = float(t)
    except ValueError:
        raise ConfigError(
            f"--noise {text!r}: expected 'uniform', 'variational' or 'gaussian:STD', e.g. gaussian:0.05"
        ) from None
    if not (std > 0 and math.isfinite(std)):
        raise ConfigError(f"--noise {text!r}: the Gaussian noise std must be positive")
    return "gaussian", std
