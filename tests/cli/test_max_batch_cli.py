"""--max-batch on sample, denoise, score and eval: the same results in smaller passes, recorded with
TF32 (off on a CPU); accuracy over many classes leaves eval's defaults and tells its cost."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tarflow_cli.io import NPZ_META_KEY
from tarflow_cli.main import app
from tarflow_core.checkpoint import save_checkpoint
from tests.conftest import tiny_model

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})  # help unabridged
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result


def metadata(path) -> dict:
    with np.load(path) as z:
        return json.loads(str(z[NPZ_META_KEY]))


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    """A tiny class-conditional model trained (so it says) with Gaussian noise 0.1."""
    path = tmp_path_factory.mktemp("ck") / "cond"
    model = tiny_model(seed=3, dtype=torch.float32, num_classes=10)  # the digits' classes
    save_checkpoint(path, model, noise={"type": "gaussian", "std": 0.1}, step=7)
    return path


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory):
    """101 classes: one more than eval computes accuracy for by default."""
    path = tmp_path_factory.mktemp("ck") / "many"
    save_checkpoint(path, tiny_model(seed=5, dtype=torch.float32, num_classes=101), step=1)
    return path


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory):
    from tarflow_core.data import load_digits_arrays

    images, labels = load_digits_arrays()
    path = tmp_path_factory.mktemp("data") / "few.npz"
    np.savez(path, arr_0=images[:12].transpose(0, 2, 3, 1), labels=labels[:12].astype(np.int64))
    return path


def test_sample_and_denoise_in_passes_give_the_same_images(cond_ckpt, tmp_path):
    one, passes = tmp_path / "one.npz", tmp_path / "passes.npz"
    base = ["sample", "-c", cond_ckpt, "-n", 5, "--seed", 2, "--out"]
    run(*base, tmp_path / "one.npy")
    run(*base, tmp_path / "passes.npy", "--max-batch", 2)
    assert np.allclose(np.load(tmp_path / "one.npy"), np.load(tmp_path / "passes.npy"), rtol=0, atol=1e-6)
    run(*base, one)
    r = run(*base, passes, "--max-batch", 2, "-v")
    assert metadata(one)["tf32"] is False and metadata(one)["max_batch"] is None
    assert metadata(passes)["max_batch"] == 2 and "tf32 off" in r.stderr and "max batch 2" in r.stderr
    den = ["denoise", "-c", cond_ckpt, tmp_path / "one.npy", "--out"]
    run(*den, tmp_path / "d1.npz")
    run(*den, tmp_path / "d2.npz", "--max-batch", 3)
    with np.load(tmp_path / "d1.npz") as a, np.load(tmp_path / "d2.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    assert metadata(tmp_path / "d2.npz")["max_batch"] == 3 and metadata(tmp_path / "d2.npz")["tf32"] is False


def test_score_in_passes_gives_the_same_scores_and_posteriors(cond_ckpt, tmp_path):
    np.save(tmp_path / "x.npy", (torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1).numpy())
    base = ["score", "-c", cond_ckpt, tmp_path / "x.npy", "--classify", "-f", "jsonl"]
    one = [json.loads(line) for line in run(*base).stdout.splitlines()]
    for size in (1, 4):
        chunked = [json.loads(line) for line in run(*base, "--max-batch", size).stdout.splitlines()]
        assert [r["pred"] for r in chunked] == [r["pred"] for r in one]
        assert np.allclose([r["nll"] for r in chunked], [r["nll"] for r in one], rtol=0, atol=1e-6)
        assert np.allclose([r["log_probs"] for r in chunked], [r["log_probs"] for r in one], rtol=0, atol=1e-5)


def test_eval_in_passes_gives_the_same_metrics_and_records_the_settings(cond_ckpt, few_digits):
    base = ["eval", "-c", cond_ckpt, "--data", few_digits, "--split", "all", "--batch-size", 6]
    one = json.loads(run(*base).stdout)
    passes = json.loads(run(*base, "--max-batch", 4).stdout)
    assert one["settings"]["metrics"] == ["bpd", "accuracy"]
    assert one["settings"]["tf32"] is False and one["settings"]["max_batch"] is None
    assert passes["settings"]["max_batch"] == 4
    assert abs(passes["metrics"]["bpd"] - one["metrics"]["bpd"]) < 1e-6
    assert passes["metrics"]["accuracy"] == one["metrics"]["accuracy"]


def test_accuracy_over_many_classes_is_asked_for_and_its_cost_told(many_classes, few_digits):
    base = ["eval", "-c", many_classes, "--data", few_digits, "--split", "all", "--batch-size", 6]
    r = run(*base)
    assert json.loads(r.stdout)["settings"]["metrics"] == ["bpd"]
    assert "note: accuracy is not among the default metrics for a model of 101 classes" in r.stderr
    r = run(*base, "--metrics", "accuracy", "--max-batch", 100)
    assert "accuracy" in json.loads(r.stdout)["metrics"]
    told = [line for line in r.stderr.splitlines() if line.startswith("accuracy: ")]
    # 2 batches of 6 images x 101 classes = 606 pairs each, in passes of 100: 7 per batch
    assert told and "12 images x 101 classes = 1,212 image x class scorings" in told[0]
    assert "in 14 passes of up to 100 pairs" in told[0]


def test_help_names_the_option_and_the_accuracy_threshold():
    for command in ("sample", "score", "denoise", "eval"):
        assert "--max-batch" in run(command, "--help").stdout
    assert "at most 100" in " ".join(run("eval", "--help").stdout.split())
