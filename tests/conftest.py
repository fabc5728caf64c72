"""Shared test helpers: tiny models and the reference fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tarflow_core.config import ModelConfig
from tarflow_core.model import TarFlow

# One intra-op thread: the tests check behaviour, not speed, and several threads on a shared
# 2-core machine wait on each other at every small operator. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "mltarflow"


def tiny_config(**overrides) -> ModelConfig:
    """A model of a few thousand parameters: 1x4x4 images, patch 2 (4 tokens of 4), width 16."""
    base = dict(
        in_channels=1,
        img_size=4,
        patch_size=2,
        width=16,
        num_blocks=2,
        layers_per_block=1,
        head_dim=8,
        expansion=2,
        nvp=True,
        num_classes=0,
    )
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, dtype=torch.float64, var: bool = False, **overrides) -> TarFlow:
    """A tiny model with every weight random (the zero-initialised heads would make it the identity)."""
    torch.manual_seed(seed)
    model = TarFlow(tiny_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.15)
        if var:
            model.var.copy_(torch.rand_like(model.var) + 0.5)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "cond_nvp.pth").exists():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def expected(fixtures_dir) -> dict:
    return torch.load(fixtures_dir / "cond_nvp_expected.pt", weights_only=True)
