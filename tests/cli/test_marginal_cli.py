"""A model with the learned marginal map at the command line: train records it (by default for
likelihood runs), info shows it, score's bits/dim and sample's images go through it, and a bad
--marginal-bins is one sentence with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from tarflow_cli.main import app
from tarflow_core.checkpoint import load_model
from tarflow_core.likelihood import bpd

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


TINY = (
    "--width",
    16,
    "--head-dim",
    8,
    "--blocks",
    2,
    "--batch-size",
    8,
    "--max-steps",
    6,
    "--eval-every",
    0,
    "--sample-every",
    0,
)


def test_a_likelihood_run_learns_the_map_and_every_command_uses_it(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (40, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    res = run("train", "-d", tmp_path / "images.npy", *TINY, "--noise", "uniform", "--run-dir", tmp_path / "r",
              "--ui", "plain")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    model = load_model(tmp_path / "r")
    assert model.config.marginal_bins == 256 and model.marginal.theta.abs().max() > 0
    info = run("info", "--ckpt", tmp_path / "r")
    assert "marginal map" in info.stdout and "256 bins" in info.stdout
    scored = run("score", "-c", tmp_path / "r", tmp_path / "images.npy", "-f", "jsonl", "--seed", 3)
    got = [json.loads(line)["bpd"] for line in scored.stdout.splitlines()]
    x = torch.from_numpy(images).unsqueeze(1)
    want = bpd(model, x, generator=torch.Generator().manual_seed(3))
    assert np.allclose(got, want.numpy(), atol=1e-5)
    noise = torch.randn(3, model.config.num_patches, model.config.token_dim, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "noise.npy", noise.numpy())
    sampled = run("sample", "--ckpt", tmp_path / "r", "--noise", tmp_path / "noise.npy", "--out", tmp_path / "x.npy")
    assert sampled.exit_code == 0, sampled.stderr
    raw = torch.from_numpy(np.load(tmp_path / "x.npy"))  # model-space values: f^-1 of the blocks' inverse
    assert (raw - model.reverse(noise)).abs().max() < 1e-5


def test_a_bad_marginal_bins_is_one_sentence(tmp_path):
    res = run("train", *TINY, "--marginal-bins", -1, "--run-dir", tmp_path / "r", "--ui", "plain")
    assert res.exit_code == 2 and "--marginal-bins" in res.stderr and len(res.stderr.strip().splitlines()) == 1
