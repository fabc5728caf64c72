"""`tarflow eval` end to end: bpd / accuracy / FID JSON, caches, and bad input."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from tarflow_cli.commands.eval import eval_cmd
from tarflow_core.checkpoint import save_checkpoint
from tarflow_core.metrics import WEIGHTS_FILENAME, WEIGHTS_URL
from tests.conftest import tiny_model
from tests.core.test_metrics_bpd import trained_checkpoint

app = typer.Typer(pretty_exceptions_enable=False)
app.command("eval")(eval_cmd)


@app.callback()
def _root() -> None:
    """Keeps `eval` a sub-command, as in the real app."""


runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["eval", *[str(a) for a in args]])


def ok_json(result) -> dict:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # one JSON object on stdout, nothing else
    return json.loads(lines[0])


def assert_user_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    last = [line for line in result.stderr.strip().splitlines() if line.strip()][-1]
    for n in needles:
        assert str(n) in last, (n, last)


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """No real cache, no network: FID weights only from what a test provides."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("TARFLOW_INCEPTION", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def offline(*a, **k):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return tmp_path


@pytest.fixture(scope="module")
def uncond_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "uncond"
    save_checkpoint(path, tiny_model(seed=4, dtype=torch.float32), noise={"type": "gaussian", "std": 0.1}, step=3)
    return path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """24 digits as an .npz data source (few images keep the Inception passes short; batches of 12
    everywhere, so the CPU convolution kernels are prepared for one batch shape only)."""
    from tarflow_core.data import load_digits_arrays

    images, labels = load_digits_arrays()
    path = tmp_path_factory.mktemp("data") / "few.npz"
    np.savez(path, arr_0=images[:24].transpose(0, 2, 3, 1), labels=labels[:24].astype(np.int64))
    return path


def test_bpd_and_accuracy_of_the_trained_digits_model(tmp_path):
    ckpt = trained_checkpoint()
    out = ok_json(
        run(
            "--ckpt",
            ckpt,
            "--data",
            "digits",
            "--split",
            "test",
            "--metrics",
            "bpd,accuracy",
            "--batch-size",
            64,
            "--seed",
            3,
            "--device",
            "cpu",
        )
    )
    assert set(out) >= {"metrics", "settings", "num_samples", "num_images", "checkpoint"}
    assert out["num_images"] == 297 and out["num_samples"] == 0 and out["checkpoint"] == str(ckpt)
    m = out["metrics"]
    assert 1.0 < m["bpd"] < 8.0 and m["accuracy"] > 0.3  # chance is 0.1
    assert out["settings"]["seed"] == 3 and out["settings"]["dequant_samples"] == 1
    assert out["settings"]["metrics"] == ["bpd", "accuracy"]

    # equal to `tarflow score` averaged over the same images with the same seed
    from tarflow_cli.main import app as full_app
    from tarflow_core.data import open_dataset

    test = open_dataset("digits", "test")
    np.savez(
        tmp_path / "test.npz",
        arr_0=np.stack([test[i][0].numpy() for i in range(297)]).transpose(0, 2, 3, 1),
        labels=np.array([test[i][1] for i in range(297)]),
    )
    r = runner.invoke(
        full_app,
        [
            "score",
            "--ckpt",
            str(ckpt),
            str(tmp_path / "test.npz"),
            "--format",
            "jsonl",
            "--seed",
            "3",
            "--batch-size",
            "64",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.stderr
    assert np.mean([json.loads(line)["bpd"] for line in r.stdout.splitlines()]) == pytest.approx(m["bpd"], abs=1e-6)

    # deterministic with --seed; more dequantization draws change it only a little
    assert (
        ok_json(run("--ckpt", ckpt, "--metrics", "bpd", "--batch-size", 64, "--seed", 3, "--device", "cpu"))["metrics"][
            "bpd"
        ]
        == m["bpd"]
    )
    k2 = ok_json(
        run(
            "--ckpt",
            ckpt,
            "--metrics",
            "bpd",
            "--batch-size",
            64,
            "--seed",
            3,
            "--dequant-samples",
            2,
            "--device",
            "cpu",
        )
    )
    assert abs(k2["metrics"]["bpd"] - m["bpd"]) < 0.05 and k2["settings"]["dequant_samples"] == 2


def test_default_metrics_follow_the_model(uncond_ckpt):
    out = ok_json(run("--ckpt", uncond_ckpt, "--device", "cpu"))
    assert list(out["metrics"]) == ["bpd", "bpd_stderr", "nll"] and out["settings"]["metrics"] == ["bpd"]


def test_fid_plumbing_with_random_inception_weights_and_caches(uncond_ckpt, small_data, tmp_path, isolated_caches):
    stats = tmp_path / "ref.npz"
    cache = tmp_path / "samples"
    args = [
        "--ckpt",
        uncond_ckpt,
        "--data",
        small_data,
        "--split",
        "all",
        "--metrics",
        "fid",
        "--num-samples",
        12,
        "--batch-size",
        5,
        "--inception-weights",
        "random",
        "--inception-size",
        75,
        "--fid-batch-size",
        12,
        "--fid-stats",
        stats,
        "--sample-cache",
        cache,
        "--seed",
        1,
        "--device",
        "cpu",
    ]
    r = run(*args)
    out = ok_json(r)
    assert "computing FID reference statistics" in r.stderr and "plumbing check" in r.stderr
    assert out["num_samples"] == 12 and out["metrics"]["fid"] > 0
    assert any("plumbing check" in w for w in out["warnings"])
    s = out["settings"]
    assert s["inception_weights"] == "random-0" and s["inception_weights_sha256"] == "random-0"
    assert s["fid_stats"] == str(stats) and s["samples_from_cache"] == 0 and s["denoise_sigma"] == 0.1
    assert s["fid_reference_images"] == 24
    with np.load(stats) as z:
        assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048) and int(z["num_images"]) == 24
        assert str(z["inception"]) == "random-0/tf/75"
    assert (cache / "manifest.json").is_file() and (cache / "shard-000000.npz").is_file()

    # again: reference statistics read back, samples read from the cache, same FID
    r2 = run(*args)
    again = ok_json(r2)
    assert "computing" not in r2.stderr
    assert again["settings"]["samples_from_cache"] == 12 and again["settings"]["fid_reference_images"] == 24
    assert again["metrics"]["fid"] == pytest.approx(out["metrics"]["fid"], rel=1e-6)
    # statistics made with other Inception weights are used, with a warning
    warned = ok_json(run(*[a if a != "random" else "random:1" for a in args]))
    assert any("computed with Inception random-0/tf/75" in w for w in warned["warnings"])
    # other sampling settings may not reuse that cache
    assert_user_error(run(*args, "--guidance", 1.0, "--attn-temp", 0.5), "--sample-cache", "different settings")

    # without --fid-stats, reference statistics are cached by data source, split, image shape and weights
    r3 = run(
        "--ckpt",
        uncond_ckpt,
        "--data",
        small_data,
        "--split",
        "all",
        "--metrics",
        "fid",
        "--num-samples",
        12,
        "--inception-weights",
        "random:7",
        "--inception-size",
        75,
        "--fid-batch-size",
        12,
        "--no-denoise",
        "--device",
        "cpu",
    )
    path = ok_json(r3)["settings"]["fid_stats"]
    assert "computing" in r3.stderr and Path(path).is_file()
    assert path.startswith(str(isolated_caches / "xdg" / "tarflow" / "fid-stats"))
    assert "few.npz-" in path and path.endswith("-all-1x4-tf75-random-7.npz")


# ------------------------------------------------------------------------------------ bad input


def test_missing_inception_weights_offline(uncond_ckpt, isolated_caches):
    r = run("--ckpt", uncond_ckpt, "--metrics", "fid", "--num-samples", 4, "--device", "cpu")
    where = isolated_caches / "xdg" / "tarflow" / WEIGHTS_FILENAME
    assert_user_error(r, "Inception weights not found; download", WEIGHTS_URL, str(where), "--inception-weights")
    r = run(
        "--ckpt",
        uncond_ckpt,
        "--metrics",
        "fid",
        "--inception-weights",
        isolated_caches / "none.pth",
        "--device",
        "cpu",
    )
    assert_user_error(r, "--inception-weights", "none.pth", "no such file")


def test_stats_file_with_wrong_shapes(uncond_ckpt, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(64), sigma=np.eye(64))
    r = run(
        "--ckpt",
        uncond_ckpt,
        "--metrics",
        "fid",
        "--num-samples",
        4,
        "--fid-stats",
        bad,
        "--inception-weights",
        "random",
        "--inception-size",
        75,
        "--device",
        "cpu",
    )
    assert_user_error(r, str(bad), "(2048,)", "(2048, 2048)")


def test_accuracy_needs_a_conditional_model(uncond_ckpt):
    r = run("--ckpt", uncond_ckpt, "--metrics", "accuracy", "--device", "cpu")
    assert_user_error(r, "--metrics accuracy", "unconditional", "class-conditional")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--metrics", "bpd,sharpness"], ["--metrics bpd,sharpness", "bpd, fid, accuracy"]),
        (["--data", "/no/such/data"], ["/no/such/data", "does not exist"]),
        (["--split", "holdout"], ["--split holdout", "train, test"]),
        (["--metrics", "fid", "--fid-stats", "."], ["--fid-stats .", "is a folder"]),
        (["--metrics", "fid", "--num-samples", "1"], ["--num-samples 1", "at least 2"]),
        (["--guide-what", "c"], ["--guide-what c"]),
        (["--inception-resize", "cubic"], ["--inception-resize cubic"]),
        (["--metrics", "fid", "--segments", "0"], ["--segments 0", "positive integer"]),
        (["--sampler", "magic"], ["--sampler magic"]),
    ],
)
def test_bad_options(uncond_ckpt, args, needles):
    assert_user_error(run("--ckpt", uncond_ckpt, "--device", "cpu", *args), *needles)


def test_command_is_registered_in_the_main_app_when_the_lead_adds_it():
    from tarflow_cli.main import app as full_app

    names = [c.name for c in full_app.registered_commands]
    if "eval" not in names:
        pytest.skip("`eval` is not registered in tarflow_cli.main yet")
    assert any(c.callback is eval_cmd for c in full_app.registered_commands if c.name == "eval")


def test_default_data_is_what_the_checkpoint_was_trained_on(tmp_path):
    model = tiny_model(dtype=torch.float32)  # 1x4x4, unconditional
    c = model.config
    images = np.random.default_rng(0).integers(0, 256, (40, c.img_size, c.img_size), dtype=np.uint8)
    np.save(tmp_path / "train.npy", images)
    save_checkpoint(
        tmp_path / "ck",
        model,
        data={"source": str(tmp_path / "train.npy"), "channels": 1, "image_size": c.img_size, "num_classes": 0},
    )
    assert ok_json(run("--ckpt", tmp_path / "ck", "--metrics", "bpd"))["settings"]["data"] == str(
        tmp_path / "train.npy"
    )
    (tmp_path / "train.npy").unlink()
    assert_user_error(run("--ckpt", tmp_path / "ck", "--metrics", "bpd"), "--data", "train.npy, which is not here")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--metrics", "bpd", "--guidance", "2"], ["--guidance 2.0", "fid"]),
        (["--metrics", "bpd", "--inception-weights", "random"], ["--inception-weights random", "fid"]),
        (["--metrics", "bpd", "--num-samples", "100"], ["--num-samples 100", "fid"]),
        (["--metrics", "bpd", "--no-denoise"], ["--no-denoise", "fid"]),
        (["--metrics", "fid", "--dequant-samples", "4"], ["--dequant-samples 4", "bpd"]),
    ],
)
def test_options_the_chosen_metrics_never_read_are_refused(uncond_ckpt, args, needles):
    assert_user_error(run("--ckpt", uncond_ckpt, "--device", "cpu", *args), *needles)


def test_a_colour_model_that_records_no_data_asks_for_data(tmp_path):
    """The digits fallback is for grayscale models only: an RGB model (e.g. a published .pth) on
    digits copied into three channels would print numbers that mean nothing."""
    path = tmp_path / "rgb"
    save_checkpoint(path, tiny_model(seed=1, dtype=torch.float32, in_channels=3), step=1)
    assert_user_error(run("--ckpt", path, "--device", "cpu"), "--data", "does not record", "3-channel")
