"""Typed settings. `ModelConfig` fully describes a TarFlow network; it is saved in every checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a TarFlow model (the reference's `Model(...)` arguments, plus head size)."""

    in_channels: int = 1
    img_size: int = 8
    patch_size: int = 2
    width: int = 64
    num_blocks: int = 4
    layers_per_block: int = 2
    head_dim: int = 64
    expansion: int = 4
    nvp: bool = True
    num_classes: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "in_channels",
            "img_size",
            "patch_size",
            "width",
            "num_blocks",
            "layers_per_block",
            "head_dim",
            "expansion",
        ):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be a positive integer (got {getattr(self, name)})")
        if self.num_classes < 0:
            problems.append(f"num_classes must be >= 0 (got {self.num_classes})")
        if not problems and self.img_size % self.patch_size:
            problems.append(f"image size {self.img_size} is not a multiple of patch size {self.patch_size}")
        if not problems and self.width % self.head_dim:
            problems.append(f"width {self.width} is not a multiple of head dim {self.head_dim}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def num_patches(self) -> int:
        """T: tokens per image."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        """D: values per token (C * p * p)."""
        return self.in_channels * self.patch_size**2

    @property
    def num_heads(self) -> int:
        return self.width // self.head_dim

    @property
    def data_dim(self) -> int:
        """C * H * W: dimensions of one image."""
        return self.in_channels * self.img_size**2

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def short_name(self) -> str:
        """The reference's architecture tag: patch-width-blocks-layers."""
        return f"{self.patch_size}-{self.width}-{self.num_blocks}-{self.layers_per_block}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return dataclass_from_dict(cls, d, ValueError, "model config keys")

    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (the `var` buffer is not a parameter)."""
        T, D, W, E, K = self.num_patches, self.token_dim, self.width, self.expansion, self.num_classes
        layer = 2 * W + 3 * W * W + 3 * W + W * W + W + 2 * W + E * W * W + E * W + E * W * W + W
        out = 2 * D if self.nvp else D
        block = D * W + W + T * W + K * W + self.layers_per_block * layer + W * out + out
        return self.num_blocks * block

    def flops_per_image(self) -> float:
        """Approximate forward FLOPs per image (matmuls only, 2 FLOPs per multiply-add)."""
        T, D, W, E = self.num_patches, self.token_dim, self.width, self.expansion
        per_layer = T * (2 * W * 3 * W + 2 * W * W + 2 * 2 * W * E * W) + 2 * 2 * T * T * W / 2
        per_block = T * 2 * D * W + self.layers_per_block * per_layer + T * 2 * W * D * (2 if self.nvp else 1)
        return float(self.num_blocks * per_block)


def dataclass_from_dict(cls, d: dict[str, Any], error: type[Exception], what: str):
    """Build dataclass `cls` from a dict, naming any keys it does not know."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise error(f"unknown {what}: {', '.join(unknown)}")
    return cls(**d)


def guess_channels_and_patch(token_dim: int) -> tuple[int, int] | None:
    """Split D = C * p * p when the patch size is unknown: C=3 if D/3 is a square, else C=1 if D is."""
    if token_dim % 3 == 0 and _is_square(token_dim // 3):
        return 3, math.isqrt(token_dim // 3)
    if _is_square(token_dim):
        return 1, math.isqrt(token_dim)
    return None


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n
