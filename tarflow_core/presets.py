"""Training settings: the frozen `TrainConfig` and the named presets (`tiny`, `mnist`, ...).

Every setting of a training run lives here, with a name the CLI exposes as an option
(`--patch-size`, `--lr`, ...). A preset is a `TrainConfig`; command-line overrides are applied
with `TrainConfig.replace(**changes)`. The data shape (channels, image size, classes) is read
off the data unless given, so `model_config(...)` builds the `ModelConfig` once the data is open.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .config import ModelConfig, dataclass_from_dict

NOISE_TYPES = ("gaussian", "uniform")
PRECISIONS = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A training setting that cannot work; the message names the option and what was expected."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run, all of it. `None` means "decide from the data / the run"."""

    preset: str = "tiny"
    # data
    data: str | None = "digits"
    image_size: int | None = None
    channels: int | None = None
    flip: bool = False
    workers: int = 0
    # architecture (ModelConfig fields; shape and classes come from the data)
    patch_size: int = 2
    width: int = 64
    blocks: int = 4
    layers_per_block: int = 1
    head_dim: int = 32
    expansion: int = 4
    nvp: bool = True
    conditional: bool | None = None  # None: conditional when the data has labels
    label_drop: float = 0.1
    # noise augmentation
    noise: str = "gaussian"  # "gaussian" or "uniform" (dequantization, likelihood runs)
    noise_std: float = 0.1
    # optimisation
    batch_size: int = 64  # global: per-process batch x world size
    lr: float = 2e-3
    min_lr: float = 1e-6
    warmup_steps: int | None = None  # None: one epoch
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = None  # max global grad norm; None/0: off
    ema: float | None = None  # EMA decay (e.g. 0.9999); None/0: off
    # length: max_steps wins when both are given
    max_steps: int | None = 1500
    epochs: float | None = None
    # numerics
    precision: str = "auto"  # auto: bf16 on CUDA for Gaussian-noise runs, else fp32
    compile: bool = False
    # intervals, in steps (0: never, except the final checkpoint; log_every 0: about 100 lines per run)
    log_every: int = 25
    eval_every: int = 250
    sample_every: int = 250
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # newest checkpoints kept (0: keep all)
    num_samples: int = 100  # images in each sample grid
    eval_images: int | None = 2000  # held-out images per evaluation (None: the whole split)
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    # run control
    seed: int = 0
    device: str = "auto"
    run_dir: str | None = None  # None: runs/<preset>-<time>

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        problems = []

        def positive(name: str) -> None:
            v = getattr(self, name)
            if v is not None and v < 1:
                problems.append(f"--{name.replace('_', '-')} must be a positive integer (got {v})")

        for name in (
            "patch_size",
            "width",
            "blocks",
            "layers_per_block",
            "head_dim",
            "expansion",
            "batch_size",
            "image_size",
            "max_steps",
            "num_samples",
            "eval_images",
            "max_bad_steps",
        ):
            positive(name)
        for name in (
            "log_every",
            "eval_every",
            "sample_every",
            "checkpoint_every",
            "keep_checkpoints",
            "workers",
            "warmup_steps",
        ):
            v = getattr(self, name)
            if v is not None and v < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0 (got {v})")
        if self.channels is not None and self.channels not in (1, 3):
            problems.append(f"--channels must be 1 or 3 (got {self.channels})")
        if self.noise not in NOISE_TYPES:
            problems.append(f"--noise must be 'uniform' or 'gaussian:STD' (got {self.noise!r})")
        if self.noise == "gaussian" and not (self.noise_std > 0 and math.isfinite(self.noise_std)):
            problems.append(f"--noise gaussian:STD needs a positive STD (got {self.noise_std})")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if not 0 <= self.label_drop < 1:
            problems.append(f"--label-drop must be in [0, 1) (got {self.label_drop})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"--lr must be positive (got {self.lr})")
        if self.lr > 0 and not 0 <= self.min_lr <= self.lr:
            problems.append(f"--min-lr must be between 0 and --lr (got {self.min_lr})")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"--{name} must be in [0, 1) (got {getattr(self, name)})")
        if self.weight_decay < 0:
            problems.append(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if self.grad_clip is not None and self.grad_clip < 0:
            problems.append(f"--grad-clip must be >= 0 (got {self.grad_clip})")
        if self.ema is not None and not 0 <= self.ema < 1:
            problems.append(f"--ema must be a decay in [0, 1), e.g. 0.9999 (got {self.ema})")
        if self.epochs is not None and not self.epochs > 0:
            problems.append(f"--epochs must be positive (got {self.epochs})")
        if self.max_steps is None and self.epochs is None:
            problems.append("give the run a length: --max-steps or --epochs")
        if self.width % self.head_dim if self.width and self.head_dim else False:
            problems.append(f"--width {self.width} must be a multiple of --head-dim {self.head_dim}")
        if self.image_size is not None and self.patch_size and self.image_size % self.patch_size:
            problems.append(f"--image-size {self.image_size} must be a multiple of --patch-size {self.patch_size}")
        if problems:
            raise ConfigError("; ".join(problems))

    # ---------------------------------------------------------------------------- helpers
    @property
    def noise_spec(self) -> dict[str, Any]:
        """The checkpoint's `noise` entry: {"type", "std"}."""
        return (
            {"type": "uniform", "std": None} if self.noise == "uniform" else {"type": "gaussian", "std": self.noise_std}
        )

    @property
    def noise_label(self) -> str:
        return "uniform" if self.noise == "uniform" else f"gaussian:{self.noise_std:g}"

    @property
    def grad_clip_value(self) -> float | None:
        return self.grad_clip if self.grad_clip else None

    @property
    def ema_decay(self) -> float | None:
        return self.ema if self.ema else None

    def model_config(self, channels: int, image_size: int, num_classes: int) -> ModelConfig:
        """The architecture for data of this shape (`num_classes` 0: unconditional)."""
        conditional = num_classes > 0 if self.conditional is None else self.conditional
        if conditional and num_classes == 0:
            raise ConfigError(f"--conditional needs labelled data, but {self.data} has no labels")
        if image_size % self.patch_size:  # the size may come from the data, so validate() cannot see it
            raise ConfigError(
                f"image size {image_size} (--image-size) is not a multiple of patch size "
                f"{self.patch_size} (--patch-size)"
            )
        try:
            return ModelConfig(
                in_channels=channels,
                img_size=image_size,
                patch_size=self.patch_size,
                width=self.width,
                num_blocks=self.blocks,
                layers_per_block=self.layers_per_block,
                head_dim=self.head_dim,
                expansion=self.expansion,
                nvp=self.nvp,
                num_classes=num_classes if conditional else 0,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def resolved_precision(self, device_type: str) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if device_type == "cuda" and self.noise == "gaussian" else "fp32"

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with `changes` applied (`None` values are ignored: "not given")."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return dataclass_from_dict(cls, d, ConfigError, "training settings")


def parse_noise(text: str) -> tuple[str, float | None]:
    """`uniform` or `gaussian:STD` (also `gaussian=STD`, or a bare number) -> (type, std)."""
    t = text.strip().lower()
    if t == "uniform":
        return "uniform", None
    for sep in (":", "="):
        if t.startswith("gaussian" + sep):
            t = t[len("gaussian") + 1 :]
            break
    try:
        std = float(t)
    except ValueError:
        raise ConfigError(f"--noise {text!r}: expected 'uniform' or 'gaussian:STD', e.g. gaussian:0.05") from None
    if not (std > 0 and math.isfinite(std)):
        raise ConfigError(f"--noise {text!r}: the Gaussian noise std must be positive")
    return "gaussian", std


# ------------------------------------------------------------------------------------ presets
# Published settings (docs/reference-notes.md "Published configurations"): AdamW (0.9, 0.95),
# weight decay 1e-4, one epoch of linear warm-up then cosine to 1e-6, label drop 0.1 for
# conditional runs, bf16 for Gaussian-noise runs and fp32 for the likelihood run.
_PUBLISHED = dict(
    head_dim=64,
    expansion=4,
    lr=1e-4,
    min_lr=1e-6,
    warmup_steps=None,
    weight_decay=1e-4,
    max_steps=None,
    precision="auto",
    log_every=100,
    eval_every=5000,
    sample_every=5000,
    checkpoint_every=5000,
    num_samples=64,
    eval_images=10000,
    workers=8,
)

PRESETS: dict[str, TrainConfig] = {
    # The CPU demo: 8x8 digits, recognisable samples within minutes on two cores.
    "tiny": TrainConfig(),
    # MNIST toy from the reference notebook: 4-128-4-4, noise 0.1, batch 256, 100 epochs, lr 2e-3.
    "mnist": TrainConfig(
        preset="mnist",
        data=None,
        patch_size=4,
        width=128,
        blocks=4,
        layers_per_block=4,
        head_dim=64,
        noise="gaussian",
        noise_std=0.1,
        batch_size=256,
        lr=2e-3,
        max_steps=None,
        epochs=100,
        log_every=50,
        eval_every=1000,
        sample_every=1000,
        checkpoint_every=1000,
        num_samples=100,
        eval_images=10000,
        workers=2,
    ),
    # CIFAR-10 is not in the published table: the ImageNet 64 recipe at 32x32 (patch 2, 256 tokens).
    "cifar10": TrainConfig(
        preset="cifar10",
        data=None,
        image_size=32,
        patch_size=2,
        width=768,
        blocks=8,
        layers_per_block=8,
        noise="gaussian",
        noise_std=0.05,
        batch_size=256,
        epochs=200,
        flip=True,
        **_PUBLISHED,
    ),
    "imagenet64": TrainConfig(
        preset="imagenet64",
        data=None,
        image_size=64,
        patch_size=2,
        width=768,
        blocks=8,
        layers_per_block=8,
        conditional=False,
        noise="uniform",
        batch_size=256,
        epochs=100,
        **_PUBLISHED,
    ),
    "imagenet64-cond": TrainConfig(
        preset="imagenet64-cond",
        data=None,
        image_size=64,
        patch_size=2,
        width=768,
        blocks=8,
        layers_per_block=8,
        conditional=True,
        noise="gaussian",
        noise_std=0.05,
        batch_size=256,
        epochs=200,
        **_PUBLISHED,
    ),
    "imagenet128-cond": TrainConfig(
        preset="imagenet128-cond",
        data=None,
        image_size=128,
        patch_size=4,
        width=1024,
        blocks=8,
        layers_per_block=8,
        conditional=True,
        noise="gaussian",
        noise_std=0.15,
        batch_size=768,
        epochs=320,
        **_PUBLISHED,
    ),
    "afhq256": TrainConfig(
        preset="afhq256",
        data=None,
        image_size=256,
        patch_size=8,
        width=768,
        blocks=8,
        layers_per_block=8,
        conditional=True,
        noise="gaussian",
        noise_std=0.07,
        batch_size=256,
        epochs=4000,
        flip=True,
        **_PUBLISHED,
    ),
}

PRESET_DATA_HINTS = {
    "mnist": "MNIST IDX files (train-images-idx3-ubyte[.gz] + labels)",
    "cifar10": "the cifar-10-batches-py folder",
    "imagenet64": "downsampled ImageNet 64x64 (.npz batches or an image folder)",
    "imagenet64-cond": "downsampled ImageNet 64x64 with labels (.npz batches or a class folder)",
    "imagenet128-cond": "ImageNet as a class folder (resized to 128x128)",
    "afhq256": "the AFHQ class folder (cat/dog/wild), resized to 256x256",
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (expected one of: {', '.join(PRESETS)})")
    return PRESETS[name]
