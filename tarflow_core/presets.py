"""The named training presets (`tiny`, `mnist`, ...), each a `TrainConfig` (config.py), and what
data each one expects. Command-line overrides are applied with `TrainConfig.replace(**changes)`.
"""

from __future__ import annotations

from .config import ConfigError, TrainConfig

# The published configurations: AdamW (0.9, 0.95), weight decay 1e-4, one epoch of linear warm-up
# then cosine to 1e-6, label drop 0.1 for conditional runs, bf16 for Gaussian-noise runs and fp32
# for the likelihood run.
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
        num_blocks=4,
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
        img_size=32,
        patch_size=2,
        width=768,
        num_blocks=8,
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
        img_size=64,
        patch_size=2,
        width=768,
        num_blocks=8,
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
        img_size=64,
        patch_size=2,
        width=768,
        num_blocks=8,
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
        img_size=128,
        patch_size=4,
        width=1024,
        num_blocks=8,
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
        img_size=256,
        patch_size=8,
        width=768,
        num_blocks=8,
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
