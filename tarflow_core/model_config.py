"""`ModelConfig`: everything that defines a TarFlow network (the published code's `Model(...)`
arguments, plus head size, per-block layer counts and the dequantization); saved in every checkpoint.
Training options are `TrainConfig` in config.py, which re-exports this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DEQUANT_TYPES = ("uniform", "variational")


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
    # layers of each block in model order (blocks[0] sees the data, the last is nearest the noise);
    # None: `layers_per_block` each. Deep-shallow (STARFlow) puts most layers in the last block.
    block_layers: tuple[int, ...] | None = None
    # how discrete pixels become continuous: "uniform" (x + U[0,1)) or "variational" (x + u, u ~ q(u|x),
    # a small conditional flow trained with the model, Flow++); dequant_* size q
    dequant: str = "uniform"
    dequant_width: int = 16
    dequant_layers: int = 4
    # bins of the learned monotone map of pixel values before the blocks (marginal.py); 0: none
    marginal_bins: int = 0

    def __post_init__(self) -> None:
        if self.block_layers is not None and not isinstance(self.block_layers, tuple):  # from JSON: a list
            object.__setattr__(self, "block_layers", tuple(int(n) for n in self.block_layers))
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
            "dequant_width",
            "dequant_layers",
        ):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be a positive integer (got {getattr(self, name)})")
        if self.num_classes < 0:
            problems.append(f"num_classes must be >= 0 (got {self.num_classes})")
        if self.block_layers is not None and (
            len(self.block_layers) != self.num_blocks or min(self.block_layers, default=0) < 1
        ):
            problems.append(
                f"block_layers must give a positive layer count for each of the {self.num_blocks} blocks "
                f"(got {list(self.block_layers)})"
            )
        if self.marginal_bins < 0:
            problems.append(f"marginal_bins must be >= 0 (got {self.marginal_bins})")
        if self.dequant not in DEQUANT_TYPES:
            problems.append(f"dequant must be one of {', '.join(DEQUANT_TYPES)} (got {self.dequant!r})")
        if not problems and self.img_size % self.patch_size:
            problems.append(f"image size {self.img_size} is not a multiple of patch size {self.patch_size}")
        if not problems and self.width % self.head_dim:
            problems.append(f"width {self.width} is not a multiple of head dim {self.head_dim}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    def layers(self, block: int) -> int:
        """Transformer layers of block `block` (model order)."""
        return self.layers_per_block if self.block_layers is None else self.block_layers[block]

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
        """The reference's architecture tag: patch-width-blocks-layers; blocks of unequal depth give their
        layers in model order, `2-128-4-1+1+1+5`."""
        counts = [self.layers(i) for i in range(self.num_blocks)]
        layers = str(counts[0]) if len(set(counts)) == 1 else "+".join(map(str, counts))
        return f"{self.patch_size}-{self.width}-{self.num_blocks}-{layers}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, d, ValueError, "model config keys")

    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (the `var` buffer is not a parameter)."""
        T, D, W, E, K = self.num_patches, self.token_dim, self.width, self.expansion, self.num_classes
        layer = 2 * W + 3 * W * W + 3 * W + W * W + W + 2 * W + E * W * W + E * W + E * W * W + W
        out = 2 * D if self.nvp else D
        block = D * W + W + T * W + K * W + W * out + out  # all but the layers
        flow_params = self.num_blocks * block + sum(self.layers(i) for i in range(self.num_blocks)) * layer
        return flow_params + self.in_channels * self.marginal_bins + self.dequantizer_parameters()

    def dequantizer_parameters(self) -> int:
        """Parameters of q(u | x) (0 with uniform dequantization): two 3x3 context convolutions, and per
        coupling a 3x3 convolution of (x's half, context) and one to a scale and shift per channel."""
        if self.dequant != "variational":
            return 0
        C, W = self.in_channels, self.dequant_width
        context = 9 * C * W + W + 9 * W * W + W
        coupling = 9 * (C + W) * W + W + 9 * W * 2 * C + 2 * C
        return context + self.dequant_layers * coupling

    def flops_per_image(self) -> float:
        """Approximate forward FLOPs per image (matmuls only, 2 FLOPs per multiply-add)."""
        T, D, W, E = self.num_patches, self.token_dim, self.width, self.expansion
        per_layer = T * (2 * W * 3 * W + 2 * W * W + 2 * 2 * W * E * W) + 2 * 2 * T * T * W / 2
        per_block = T * 2 * D * W + T * 2 * W * D * (2 if self.nvp else 1)  # proj_in and proj_out
        return float(self.num_blocks * per_block + sum(self.layers(i) for i in range(self.num_blocks)) * per_layer)


def dataclass_from_dict(cls, d: dict[str, Any], error: type[Exception], what: str):
    """Build dataclass `cls` from a dict, naming any keys it does not know."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise error(f"unknown {what}: {', '.join(unknown)}")
    return cls(**d)
