"""bpd over a data set and Bayes accuracy, on a tiny conditional model trained on digits here."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tarflow_core import flow
from tarflow_core.checkpoint import load_checkpoint, save_checkpoint
from tarflow_core.config import ModelConfig
from tarflow_core.data import open_dataset
from tarflow_core.likelihood import bpd as image_bpd
from tarflow_core.metrics import bayes_accuracy, dataset_bpd
from tarflow_core.model import TarFlow
from tests.conftest import tiny_model


def train_tiny_digits(steps: int = 150, seed: int = 0, num_classes: int = 10) -> TarFlow:
    """A very small flow fitted to the digits training split with the reference loss
    0.5 * mean(z^2) - mean(logdet) / (T * D) on uniformly dequantized pixels (label drop 0.1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    try:
        torch.manual_seed(seed)
        cfg = ModelConfig(
            in_channels=1,
            img_size=8,
            patch_size=2,
            width=32,
            num_blocks=2,
            layers_per_block=1,
            head_dim=16,
            expansion=2,
            nvp=True,
            num_classes=num_classes,
        )
        model = TarFlow(cfg)
        train = open_dataset("digits", "train")
        images = torch.from_numpy(train.images[train.indices])
        labels = torch.from_numpy(train.labels[train.indices].astype(np.int64))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=1e-4)
        g = torch.Generator().manual_seed(seed)
        td = cfg.num_patches * cfg.token_dim
        for _ in range(steps):
            idx = torch.randint(len(images), (96,), generator=g)
            x = flow.dequantize_uniform(images[idx], generator=g)
            y = None
            if num_classes:
                y = torch.where(torch.rand(len(idx), generator=g) < 0.1, -1, labels[idx])
            z, logdet = model(x, y)
            loss = 0.5 * z.pow(2).mean() - (logdet / td).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@functools.cache
def trained_checkpoint() -> Path:
    """The trained conditional digits model as a native checkpoint (trained once per test session)."""
    folder = Path(tempfile.mkdtemp(prefix="tarflow-eval-test-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return save_checkpoint(
        folder / "digits-cond", train_tiny_digits(), noise={"type": "uniform", "std": None}, step=150
    )


@pytest.fixture(scope="module")
def trained():
    model, info = load_checkpoint(trained_checkpoint(), "cpu")
    return model.eval(), info


@pytest.fixture(scope="module")
def test_split():
    return open_dataset("digits", "test", image_size=8, channels=1)


def test_dataset_bpd_equals_per_image_bpd_and_is_seeded(trained, test_split):
    model, _ = trained
    res = dataset_bpd(model, test_split, batch_size=100, generator=torch.Generator().manual_seed(5))
    assert res.count == len(test_split) == 297 and res.conditioned
    # the same draws, image by image, through the library's per-image bpd
    g = torch.Generator().manual_seed(5)
    per = []
    with torch.no_grad():
        for start in range(0, 297, 100):
            xb = torch.stack([test_split[i][0] for i in range(start, min(297, start + 100))])
            yb = torch.tensor([test_split[i][1] for i in range(start, min(297, start + 100))])
            per.append(image_bpd(model, xb, yb, generator=g).double())
    assert np.allclose(res.per_image, torch.cat(per).numpy(), atol=1e-5)
    again = dataset_bpd(model, test_split, batch_size=100, generator=torch.Generator().manual_seed(5))
    assert again.bpd == res.bpd
    other = dataset_bpd(model, test_split, batch_size=100, generator=torch.Generator().manual_seed(6))
    assert other.bpd != res.bpd and abs(other.bpd - res.bpd) < 0.05
    assert 1.0 < res.bpd < 8.0 and res.stderr > 0  # a trained model is far below the 8 bits of raw bytes


def test_dataset_bpd_equals_tarflow_score(trained, test_split, tmp_path):
    """Same images, seed, batch size and draws: `tarflow score` averaged = the data-set bpd."""
    from tarflow_cli.main import app

    model, _ = trained
    images = np.stack([test_split[i][0].numpy() for i in range(len(test_split))])
    labels = np.array([test_split[i][1] for i in range(len(test_split))])
    np.savez(tmp_path / "test.npz", arr_0=images.transpose(0, 2, 3, 1), labels=labels)
    for k in (1, 2):
        r = CliRunner().invoke(
            app,
            [
                "score",
                "--ckpt",
                str(trained_checkpoint()),
                str(tmp_path / "test.npz"),
                "--format",
                "jsonl",
                "--seed",
                "3",
                "--batch-size",
                "64",
                "--dequant-samples",
                str(k),
                "--device",
                "cpu",
            ],
        )
        assert r.exit_code == 0, r.stderr
        scored = np.mean([json.loads(line)["bpd"] for line in r.stdout.splitlines()])
        res = dataset_bpd(model, test_split, batch_size=64, generator=torch.Generator().manual_seed(3), samples=k)
        assert abs(res.bpd - scored) < 1e-6, (k, res.bpd, scored)


def test_bayes_accuracy_of_trained_conditional_model_is_well_above_chance(trained, test_split):
    model, _ = trained
    acc = bayes_accuracy(model, test_split, batch_size=128, generator=torch.Generator().manual_seed(0))
    assert acc.count == 297
    assert acc.accuracy > 0.3, acc.accuracy  # chance is 0.1
    assert set(acc.per_class) <= set(range(10))


def test_bayes_accuracy_needs_a_conditional_model(test_split):
    with pytest.raises(ValueError, match="class-conditional"):
        bayes_accuracy(tiny_model(dtype=torch.float32), open_dataset("digits", "test", image_size=4))


def test_unconditional_bpd_ignores_labels():
    model = tiny_model(dtype=torch.float32)
    ds = open_dataset("digits", "test", image_size=4)
    res = dataset_bpd(model, ds, batch_size=128, samples=2)
    assert not res.conditioned and res.count == len(ds) and np.isfinite(res.bpd)
