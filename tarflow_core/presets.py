"""The named training presets (`tiny`, `mnist`, ...), each a `TrainConfig` (config.py), and what
data each one expects. Command-line overrides are applied with `TrainConfig.replace(**changes)`.
"""

from __future__ import annotations

from .config import ConfigError, TrainConfig

# The published configurations: AdamW (0.9, 0.95), weight decay 1e-4, one epoch of linear warm-up
# then cosine to 1e-6, label drop 0.1 for conditional runs, bf16 for Gaussian-noise runs and fp32
# for the likelihood run; 8 blocks of 8 layers, heads of 64. The likelihood run (imagenet64, uniform
# dequantization) also gets tarflow's learned marginal map, the default for likelihood runs since it won
# on both benchmark data sets (docs/quality.md); `--marginal-bins 0` trains the published model.
_PUBLISHED = dict(
    data=None, num_blocks=8, layers_per_block=8, head_dim=64, expansion=4, lr=1e-4, min_lr=1e-6,
    warmup_steps=None, weight_decay=1e-4, max_steps=None, precision="auto", log_every=100, eval_every=5000,
    sample_every=5000, checkpoint_every=5000, num_samples=64, eval_images=10000, workers=8,
)  # fmt: skip


def _published(name: str, img_size: int, patch_size: int, width: int, noise_std: float | None, batch_size: int,
               epochs: int, **extra) -> TrainConfig:  # fmt: skip
    """A published configuration: patch-width-8-8 at this image size; `noise_std` None is uniform dequantization."""
    noise = {"noise": "uniform"} if noise_std is None else {"noise": "gaussian", "noise_std": noise_std}
    return TrainConfig(preset=name, img_size=img_size, patch_size=patch_size, width=width, batch_size=batch_size,
                       epochs=epochs, **_PUBLISHED, **noise, **extra)  # fmt: skip


# fmt: off
PRESETS: dict[str, TrainConfig] = {
    # The CPU demo: 8x8 digits, recognisable samples within minutes on two cores.
    "tiny": TrainConfig(),
    # MNIST toy from the reference notebook: 4-128-4-4, noise 0.1, batch 256, 100 epochs, lr 2e-3.
    "mnist": TrainConfig(
        preset="mnist", data=None, patch_size=4, width=128, num_blocks=4, layers_per_block=4, head_dim=64,
        noise="gaussian", noise_std=0.1, batch_size=256, lr=2e-3, max_steps=None, epochs=100, log_every=50,
        eval_every=1000, sample_every=1000, checkpoint_every=1000, num_samples=100, eval_images=10000, workers=2,
    ),
    # CIFAR-10 is not in the published table: the ImageNet 64 recipe at 32x32 (patch 2, 256 tokens).
    #                               name            size patch width noise batch epochs
    "cifar10":          _published("cifar10",           32, 2,  768, 0.05, 256,  200, flip=True),
    "imagenet64":       _published("imagenet64",        64, 2,  768, None, 256,  100, conditional=False),
    "imagenet64-cond":  _published("imagenet64-cond",   64, 2,  768, 0.05, 256,  200, conditional=True),
    "imagenet128-cond": _published("imagenet128-cond", 128, 4, 1024, 0.15, 768,  320, conditional=True),
    "afhq256":          _published("afhq256",          256, 8,  768, 0.07, 256, 4000, conditional=True, flip=True),
}
# fmt: on

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
