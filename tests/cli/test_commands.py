"""The sample / score / denoise / info commands, end to end, including bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tarflow_cli.main import app
from tarflow_core.checkpoint import load_model, save_checkpoint
from tarflow_core.likelihood import denoise, nll
from tests.conftest import tiny_model

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_user_error(result, *needles):
    """Exit 2, one line on stderr naming the culprit, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    """A tiny class-conditional model trained (so it says) with Gaussian noise 0.1."""
    path = tmp_path_factory.mktemp("ck") / "cond"
    save_checkpoint(
        path, tiny_model(seed=3, dtype=torch.float32, num_classes=3), noise={"type": "gaussian", "std": 0.1}, step=7
    )
    return path


@pytest.fixture(scope="module")
def uncond_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "uncond"
    save_checkpoint(
        path,
        tiny_model(seed=4, dtype=torch.float32, nvp=False, var=True),
        noise={"type": "uniform", "std": None},
        step=9,
    )
    return path


# ------------------------------------------------------------------------- the reference fixture


def test_cli_reproduces_reference_samples_scores_and_denoising(fixtures_dir, expected, tmp_path):
    ckpt = fixtures_dir / "cond_nvp.pth"
    np.save(tmp_path / "noise.npy", expected["noise"].numpy())
    np.save(tmp_path / "y.npy", expected["y"].numpy())
    cases = {
        "sample_g0": [],
        "sample_g2_ab": ["--guidance", 2.0],
        "sample_g1_b_annealed": ["--guidance", 1.0, "--guide-what", "b", "--annealed"],
        "sample_g15_temp05": ["--guidance", 1.5, "--attn-temp", 0.5],
        "sample_g15_temp05_annealed": ["--guidance", 1.5, "--attn-temp", 0.5, "--annealed"],
    }
    for key, opts in cases.items():
        out = tmp_path / f"{key}.npy"
        r = run(
            "sample",
            "--ckpt",
            ckpt,
            "--noise",
            tmp_path / "noise.npy",
            "--labels",
            tmp_path / "y.npy",
            "--no-denoise",
            "--out",
            out,
            "--device",
            "cpu",
            "--sampler",
            "sequential",
            *opts,
        )
        assert r.exit_code == 0, r.stderr
        assert np.abs(np.load(out) - expected[key].numpy()).max() < 1e-4, key

    np.save(tmp_path / "x.npy", expected["x"].numpy())
    r = run(
        "score",
        "--ckpt",
        ckpt,
        tmp_path / "x.npy",
        "--labels",
        tmp_path / "y.npy",
        "--dequantize",
        "none",
        "--format",
        "jsonl",
    )
    assert r.exit_code == 0, r.stderr
    records = [json.loads(l) for l in r.stdout.splitlines()]
    z, logdet = expected["z"], expected["logdets"]  # reference log-det is per dimension
    D = 3 * 8 * 8
    want = 0.5 * (z**2).flatten(1).sum(1) / D + 0.5 * np.log(2 * np.pi) - logdet
    assert np.allclose([r["nll"] for r in records], want.numpy(), atol=1e-5)
    assert [r["index"] for r in records] == list(range(6))
    assert all(abs(r["bpd"] - (r["nll"] + np.log(128)) / np.log(2)) < 1e-9 for r in records)

    np.save(tmp_path / "s.npy", expected["sample_g0"].numpy())
    r = run(
        "denoise",
        "--ckpt",
        ckpt,
        tmp_path / "s.npy",
        "--sigma",
        float(expected["denoise_sigma"]),
        "--labels",
        tmp_path / "y.npy",
        "--out",
        tmp_path / "d.npy",
    )
    assert r.exit_code == 0, r.stderr
    assert np.abs(np.load(tmp_path / "d.npy") - expected["denoised_g0"].numpy()).max() < 1e-4


# ------------------------------------------------------------------------------------ behaviour


def test_same_seed_same_images_and_every_out_form(cond_ckpt, tmp_path):
    a, b, c = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "c.npy"
    d = tmp_path / "d.npy"
    assert run("sample", "-c", cond_ckpt, "-n", 5, "--seed", 3, "--out", a).exit_code == 0
    assert run("sample", "-c", cond_ckpt, "-n", 5, "--seed", 3, "--out", b).exit_code == 0
    assert run("sample", "-c", cond_ckpt, "-n", 5, "--seed", 3, "--out", d, "-b", 2).exit_code == 0
    assert run("sample", "-c", cond_ckpt, "-n", 5, "--seed", 4, "--out", c).exit_code == 0
    assert np.array_equal(np.load(a), np.load(b))
    assert np.allclose(np.load(a), np.load(d), atol=1e-5)  # batching changes only float rounding
    assert not np.allclose(np.load(a), np.load(c), atol=1e-2)
    r = run("sample", "-c", cond_ckpt, "-n", 5, "--seed", 3, "--class", 2, "--out", tmp_path / "s.npz")
    assert r.exit_code == 0 and r.stdout.strip() == str(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].shape == (5, 4, 4, 1) and z["arr_0"].dtype == np.uint8
        assert list(z["labels"]) == [2] * 5
    assert run("sample", "-c", cond_ckpt, "-n", 3, "--out", tmp_path / "grid.png").exit_code == 0
    Image.open(tmp_path / "grid.png").verify()
    assert run("sample", "-c", cond_ckpt, "-n", 3, "--out", f"{tmp_path}/imgs/").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["000000.png", "000001.png", "000002.png"]


def test_sample_denoises_by_default_for_gaussian_noise_checkpoints(cond_ckpt, tmp_path):
    noise = torch.randn(4, 4, 4)
    np.save(tmp_path / "n.npy", noise.numpy())
    np.save(tmp_path / "y.npy", np.array([0, 1, 2, 1]))
    base = ["sample", "-c", cond_ckpt, "--noise", tmp_path / "n.npy", "--labels", tmp_path / "y.npy"]
    assert run(*base, "--out", tmp_path / "on.npy").exit_code == 0
    assert run(*base, "--no-denoise", "--out", tmp_path / "off.npy").exit_code == 0
    model = load_model(cond_ckpt)
    y = torch.tensor([0, 1, 2, 1])
    raw = model.sample(noise, y)
    assert np.allclose(np.load(tmp_path / "off.npy"), raw.numpy(), atol=1e-6)
    assert np.allclose(np.load(tmp_path / "on.npy"), denoise(model, raw, y, sigma=0.1).numpy(), atol=1e-5)


def test_score_matches_the_library_and_classifies(cond_ckpt, tmp_path):
    x = torch.rand(6, 1, 4, 4) * 2 - 1
    np.save(tmp_path / "x.npy", x.numpy())
    r = run("score", "-c", cond_ckpt, tmp_path / "x.npy", "--class", 1, "--classify", "-f", "jsonl")
    assert r.exit_code == 0, r.stderr
    recs = [json.loads(l) for l in r.stdout.splitlines()]
    model = load_model(cond_ckpt)
    want = nll(model, x, torch.ones(6, dtype=torch.long))
    assert np.allclose([q["nll"] for q in recs], want.detach().numpy(), atol=1e-6)
    for q in recs:
        assert len(q["log_probs"]) == 3 and abs(np.logaddexp.reduce(q["log_probs"])) < 1e-5
        assert q["pred"] == int(np.argmax(q["log_probs"]))
    r = run("score", "-c", cond_ckpt, tmp_path / "x.npy", "-f", "csv")
    assert r.stdout.splitlines()[0] == "index,source,nll,bpd" and len(r.stdout.splitlines()) == 7


def test_score_dequantizes_8bit_images_reproducibly(uncond_ckpt, tmp_path):
    img = np.arange(16, dtype=np.uint8).reshape(4, 4) * 15
    Image.fromarray(img, "L").save(tmp_path / "a.png")
    first = run("score", "-c", uncond_ckpt, tmp_path / "a.png", "-f", "jsonl", "--seed", 1)
    again = run("score", "-c", uncond_ckpt, tmp_path / "a.png", "-f", "jsonl", "--seed", 1)
    other = run("score", "-c", uncond_ckpt, tmp_path / "a.png", "-f", "jsonl", "--seed", 2)
    assert first.exit_code == 0, first.stderr
    assert first.stdout == again.stdout != other.stdout
    rec = json.loads(first.stdout)
    assert rec["source"] == str(tmp_path / "a.png")


def test_info_shows_what_the_checkpoint_holds(cond_ckpt):
    r = run("info", "--ckpt", cond_ckpt, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["classes"] == 3 and d["step"] == 7 and d["noise"] == {"type": "gaussian", "std": 0.1}
    assert d["data_shape"] == [1, 4, 4] and d["parameters"] == load_model(cond_ckpt).num_parameters()
    r = run("info", "--ckpt", cond_ckpt)
    assert r.exit_code == 0 and "gaussian, std 0.1" in r.stdout


def test_sample_pipes_into_score_and_denoise(cond_ckpt):
    """`tarflow sample --out - | tarflow score -` through real pipes."""
    cli = [sys.executable, "-m", "tarflow_cli"]
    sample = subprocess.run(
        cli + ["sample", "-c", str(cond_ckpt), "-n", "4", "--out", "-"], capture_output=True, check=True
    )
    arr = np.load(io.BytesIO(sample.stdout))
    assert arr.shape == (4, 1, 4, 4) and arr.dtype == np.float32
    score = subprocess.run(cli + ["score", "-c", str(cond_ckpt), "-"], input=sample.stdout, capture_output=True)
    assert score.returncode == 0, score.stderr
    recs = [json.loads(l) for l in score.stdout.decode().splitlines()]
    assert [r["source"] for r in recs] == ["-[0]", "-[1]", "-[2]", "-[3]"]
    den = subprocess.run(
        cli + ["denoise", "-c", str(cond_ckpt), "-", "--out", "-"], input=sample.stdout, capture_output=True
    )
    assert den.returncode == 0, den.stderr
    assert np.load(io.BytesIO(den.stdout)).shape == (4, 1, 4, 4)


# ------------------------------------------------------------------------------------ bad input


def test_missing_checkpoint(tmp_path):
    assert_user_error(run("sample", "--ckpt", tmp_path / "nope"), "nope", "does not exist")
    # brackets in a name are printed as they are, not read as terminal markup
    assert_user_error(run("sample", "--ckpt", tmp_path / "run[1]" / "[/b]"), "run[1]/[/b]", "does not exist")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["sample", "-c", "x", "-n", "0"], ["--num", "must be a positive integer (got 0)", "tarflow sample -h"]),
        (["sample", "-c", "x", "--check-every", "0"], ["--check-every"]),
        (["sample", "--bogus"], ["--bogus"]),
        (["sample"], ["--ckpt"]),
        (["score", "-c", "x", "-b", "many"], ["--batch-size", "expected a whole number"]),
        (["nosuch"], ["nosuch", "tarflow -h"]),
    ],
)
def test_parser_errors_are_one_line_like_every_user_error(args, needles):
    """Unknown options, bad or missing values: one line naming the option, exit 2, no usage panel."""
    assert_user_error(run(*args), *needles)


def test_help_and_bare_command_still_show_the_help():
    assert run("sample", "-h").exit_code == 0
    bare = run()
    assert "Usage" in bare.output and "sample" in bare.output


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    assert_user_error(run("info", "--ckpt", tmp_path / "bad.pth"), "bad.pth")


def test_info_checks_the_weights_it_describes_and_fails_as_sample_does(tmp_path):
    """A garbage or mismatched model.safetensors: info exits 2 naming it, with sample's message."""
    path = save_checkpoint(tmp_path / "ck", tiny_model(dtype=torch.float32))
    other = save_checkpoint(tmp_path / "other", tiny_model(dtype=torch.float32, num_classes=3))
    for weights, says in ((b"garbage", "not a readable safetensors file"), (other, "do not match the architecture")):
        (path / "model.safetensors").write_bytes(
            weights if isinstance(weights, bytes) else (weights / "model.safetensors").read_bytes()
        )
        shown = run("info", "--ckpt", path)
        assert_user_error(shown, "model.safetensors", says)
        assert_user_error(run("sample", "--ckpt", path, "-n", 1, "--out", tmp_path / "x.npy"), says)
        assert shown.stdout == ""


def test_pickled_object_checkpoint_is_refused_without_running(tmp_path):
    from tests.core.test_checkpoint import _Marker

    marker = tmp_path / "code-ran"
    torch.save({"var": torch.ones(1), "x": _Marker(marker)}, tmp_path / "evil.pth")
    assert_user_error(run("sample", "--ckpt", tmp_path / "evil.pth"), "evil.pth", "refusing")
    assert not marker.exists()


def test_noise_of_the_wrong_shape(cond_ckpt, tmp_path):
    np.save(tmp_path / "n.npy", np.zeros((2, 5, 4), np.float32))
    assert_user_error(run("sample", "-c", cond_ckpt, "--noise", tmp_path / "n.npy"), "n.npy", "(N, 4, 4)")


def test_labels_for_an_unconditional_model(uncond_ckpt, tmp_path):
    assert_user_error(run("sample", "-c", uncond_ckpt, "--class", 1), "--class", "unconditional")
    np.save(tmp_path / "y.npy", np.zeros(3, np.int64))
    assert_user_error(
        run("sample", "-c", uncond_ckpt, "-n", 3, "--labels", tmp_path / "y.npy"), "--labels", "unconditional"
    )


def test_class_out_of_range(cond_ckpt, tmp_path):
    assert_user_error(run("sample", "-c", cond_ckpt, "--class", 3), "--class 3", "0..2")
    np.save(tmp_path / "y.npy", np.array([0, 7]))
    assert_user_error(run("sample", "-c", cond_ckpt, "-n", 2, "--labels", tmp_path / "y.npy"), "y.npy", "7")


def test_unreadable_image(cond_ckpt, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert_user_error(run("score", "-c", cond_ckpt, tmp_path / "broken.png"), "broken.png")


def test_empty_input(cond_ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(run("score", "-c", cond_ckpt, tmp_path / "empty"), "empty")
    assert_user_error(run("score", "-c", cond_ckpt, "-", input=b""), "stdin")


def test_images_of_the_wrong_size(cond_ckpt, tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(tmp_path / "big.png")
    assert_user_error(run("score", "-c", cond_ckpt, tmp_path / "big.png"), "big.png", "1x4x4")


def test_classify_needs_a_conditional_model(uncond_ckpt, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 4, 4), np.float32))
    assert_user_error(run("score", "-c", uncond_ckpt, tmp_path / "x.npy", "--classify"), "--classify", "unconditional")


def test_denoise_needs_a_sigma(uncond_ckpt, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 4, 4), np.float32))
    assert_user_error(run("denoise", "-c", uncond_ckpt, tmp_path / "x.npy"), "--sigma")


def test_bad_out_and_device(cond_ckpt, tmp_path):
    assert_user_error(run("sample", "-c", cond_ckpt, "-n", 1, "--out", "x.txt"), "x.txt")
    (tmp_path / "afile").write_text("x")
    assert_user_error(run("sample", "-c", cond_ckpt, "-n", 1, "--out", f"{tmp_path}/afile/"), "is a file, not a folder")
    assert_user_error(
        run("denoise", "-c", cond_ckpt, "-", "--out", f"{tmp_path}/afile/x.png"), "nothing can be written"
    )
    assert_user_error(run("sample", "-c", cond_ckpt, "--device", "tpu"), "--device tpu")


def test_sampler_settings_are_checked_and_recorded(cond_ckpt, tmp_path):
    out = tmp_path / "s.npz"
    r = run(
        "sample",
        "-c",
        cond_ckpt,
        "-n",
        3,
        "--sampler",
        "gs-jacobi",
        "--segments",
        3,
        "--check-every",
        2,
        "--precision",
        "auto",
        "--guidance",
        1,
        "--out",
        out,
        "-v",
    )
    assert r.exit_code == 0, r.stderr
    with np.load(out) as z:
        from tarflow_cli.io import NPZ_META_KEY

        meta = json.loads(str(z[NPZ_META_KEY]))
    s = meta["sampling"]
    assert s["sampler"] == "gs-jacobi" and s["segments"] == 3 and s["check_every"] == 2
    assert s["precision"] == "fp32" and s["cuda_graphs"] is False  # auto on a CPU
    assert "check_every" in r.stderr  # --verbose prints the settings
    auto = tmp_path / "auto.png"
    r = run("sample", "-c", cond_ckpt, "-n", 2, "--out", auto, "-v")  # the default sampler: auto
    assert r.exit_code == 0, r.stderr
    from tarflow_cli.io import read_png_metadata

    recorded = read_png_metadata(auto)["sampling"]
    assert recorded["sampler"] == "sequential" and recorded["requested"] == "auto"  # what auto chose on a CPU
    assert "sampler=sequential" in r.stderr and "{" not in r.stderr  # key=value, not a Python dict
    assert_user_error(run("sample", "-c", cond_ckpt, "-n", 1, "--cuda-graphs", "--device", "cpu"), "--cuda-graphs")
    assert_user_error(run("sample", "-c", cond_ckpt, "-n", 1, "--precision", "fp16"), "--precision fp16")


@pytest.mark.parametrize("sig,delay", [("SIGINT", 0.5), ("SIGTERM", 0.5), ("SIGTERM", 4.0)])
def test_interrupt_while_loading_or_sampling_exits_130_without_traceback(cond_ckpt, tmp_path, sig, delay):
    """Early: while torch and typer load (the entry's own handler); later: mid-sampling."""
    import signal
    import time

    out = tmp_path / "never.png"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tarflow_cli", "sample", "-c", str(cond_ckpt), "-n", "100000", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(delay)
    proc.send_signal(getattr(signal, sig))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode()
    assert b"interrupted" in stderr and b"Traceback" not in stderr and not out.exists()


def test_non_finite_inputs_options_and_scores(cond_ckpt, tmp_path):
    model = load_model(cond_ckpt)
    c = model.config
    floats = np.zeros((2, c.in_channels, c.img_size, c.img_size), np.float32)
    floats[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", floats)
    for cmd in ("score", "denoise"):
        assert_user_error(run(cmd, "-c", cond_ckpt, tmp_path / "nan.npy"), "nan.npy", "1 of 2 images hold nan or inf")
    assert_user_error(run("denoise", "-c", cond_ckpt, tmp_path / "nan.npy", "--sigma", "nan"), "--sigma", "finite")
    assert_user_error(run("sample", "-c", cond_ckpt, "--denoise-sigma", "inf"), "--denoise-sigma", "finite")
    assert_user_error(run("sample", "-c", cond_ckpt, "--guidance", "-1"), "--guidance", "must be >= 0 (got -1)")
    # a model whose weights went non-finite: valid JSON (null), and a warning
    with torch.no_grad():
        model.blocks[0].proj_out.bias.fill_(float("nan"))
    broken = tmp_path / "broken"
    save_checkpoint(broken, model)
    np.save(tmp_path / "u8.npy", np.zeros((2, c.in_channels, c.img_size, c.img_size), np.uint8))
    r = run("score", "-c", broken, tmp_path / "u8.npy", "--format", "jsonl", "--classify")
    assert r.exit_code == 0, r.stderr

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    records = [json.loads(line, parse_constant=no_constants) for line in r.stdout.splitlines()]
    assert records[0]["nll"] is None and records[0]["bpd"] is None and "non-finite likelihood" in r.stderr


def test_options_that_would_be_ignored_are_refused(cond_ckpt, tmp_path):
    assert_user_error(
        run("sample", "-c", cond_ckpt, "--sampler", "sequential", "--segments", 4), "--segments 4", "gs-jacobi"
    )
    assert_user_error(
        run("sample", "-c", cond_ckpt, "--sampler", "gs-jacobi", "--segments", 100),
        "--segments 100",
        "at most 3 tokens",
    )
    c = load_model(cond_ckpt).config
    np.save(tmp_path / "f.npy", np.zeros((1, c.in_channels, c.img_size, c.img_size), np.float32))
    assert_user_error(run("score", "-c", cond_ckpt, tmp_path / "f.npy", "--dequant-samples", 3), "--dequant-samples 3")
    r = run("train", "--max-steps", 2, "--epochs", 1, "--run-dir", tmp_path / "run", "--ui", "plain")
    assert r.exit_code == 2 and "--max-steps and --epochs" in r.stderr and not (tmp_path / "run").exists()


def test_every_command_takes_device_and_seed():
    """SPEC: all commands take --device and --seed (and have --help with examples); the help lists
    them only where they do something (issue 16: not --seed on info, watch, denoise, nor --device on
    info and watch)."""
    for command in ("train", "sample", "score", "denoise", "eval", "info", "watch"):
        r = run(command, "--help")
        assert r.exit_code == 0, command
        assert "Example" in r.stdout, command
        listed = {o for o in ("--device", "--seed") if o in r.stdout}
        assert listed == {"info": set(), "watch": set(), "denoise": {"--device"}}.get(command, {"--device", "--seed"})
        for option in ("--device", "--seed"):
            taken = run(command, option, "0" if option == "--seed" else "cpu", "--help")
            assert taken.exit_code == 0, (command, option, taken.stderr)


def test_messages_and_tables_print_names_as_typed(cond_ckpt, tmp_path):
    """Rich would turn `:x:` into an emoji and `[b]` into markup; names must come out verbatim."""
    assert_user_error(
        run("sample", "-c", cond_ckpt, "--device", "cuda:x:", "--out", tmp_path / "o.png"), "--device cuda:x:"
    )
    assert_user_error(run("info", "-c", tmp_path / "run:smile:"), "run:smile:")
    c = load_model(cond_ckpt).config
    name = tmp_path / "a:smile:[b].png"
    Image.fromarray(np.zeros((c.img_size, c.img_size), np.uint8)).save(name)
    r = run("score", "-c", cond_ckpt, name, "--format", "table")
    assert r.exit_code == 0, r.stderr
    assert "a:smile:[b].png" in r.stdout


def test_a_denoise_sigma_turns_the_step_on_and_is_never_ignored(uncond_ckpt, cond_ckpt, tmp_path):
    """A uniform-noise checkpoint does not denoise by default; --denoise-sigma used to be dropped silently."""
    noise = torch.randn(3, 4, 4)
    np.save(tmp_path / "n.npy", noise.numpy())
    r = run(
        "sample", "-c", uncond_ckpt, "--noise", tmp_path / "n.npy", "--denoise-sigma", 0.2, "--out", tmp_path / "d.npy"
    )
    assert r.exit_code == 0, r.stderr
    model = load_model(uncond_ckpt)
    want = denoise(model, model.sample(noise), None, sigma=0.2)
    assert np.allclose(np.load(tmp_path / "d.npy"), want.numpy(), atol=1e-5)
    assert_user_error(
        run("sample", "-c", cond_ckpt, "-n", 1, "--no-denoise", "--denoise-sigma", 0.2),
        "--denoise-sigma 0.2",
        "--no-denoise",
    )
    assert_user_error(
        run("sample", "-c", cond_ckpt, "-n", 1, "--no-denoise", "--denoise-lr-scale", 2), "--denoise-lr-scale 2"
    )
    assert_user_error(
        run("sample", "-c", uncond_ckpt, "-n", 1, "--denoise-lr-scale", 2), "--denoise-lr-scale 2", "--denoise-sigma"
    )


def test_sampling_options_that_would_change_nothing_are_refused(cond_ckpt):
    """--attn-temp only scales the guidance pass (it is not a sampling temperature); --tol and
    --check-every only steer the Jacobi samplers. Without those, each was silently ignored."""
    base = ("sample", "-c", cond_ckpt, "-n", 1, "--out", "x.png")
    assert_user_error(run(*base, "--attn-temp", 0.5), "--attn-temp 0.5", "--guidance")
    assert_user_error(run(*base, "--annealed"), "--annealed", "--guidance")
    assert_user_error(run(*base, "--guide-what", "b"), "--guide-what b", "--guidance")
    assert_user_error(run(*base, "--sampler", "sequential", "--tol", 0.01), "--tol 0.01", "sequential")
    assert_user_error(run(*base, "--sampler", "sequential", "--check-every", 2), "--check-every 2", "sequential")


def test_denoise_takes_several_inputs_in_order_like_score(cond_ckpt, tmp_path):
    """SPEC: denoise INPUT is "images, folder, ..."; a shell glob (noisy/*.png) used to be refused."""
    c = load_model(cond_ckpt).config
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (c.img_size, c.img_size), dtype=np.uint8) for _ in range(2)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"n{i}.png")
    r = run(
        "denoise", "-c", cond_ckpt, tmp_path / "n1.png", tmp_path / "n0.png", "--class", 1, "--out", tmp_path / "d.npy"
    )
    assert r.exit_code == 0, r.stderr
    model = load_model(cond_ckpt)
    x = torch.from_numpy(np.stack([arrays[1], arrays[0]])[:, None]).float() / 127.5 - 1
    want = denoise(model, x, torch.tensor([1, 1]), sigma=0.1)
    assert np.allclose(np.load(tmp_path / "d.npy"), want.numpy(), atol=1e-5)
    Image.fromarray(np.zeros((c.img_size + 1, c.img_size + 1), np.uint8)).save(tmp_path / "big.png")
    assert_user_error(run("denoise", "-c", cond_ckpt, tmp_path / "big.png"), "big.png", "denoised as they are")


def test_info_checks_the_spelling_of_device(cond_ckpt):
    """info puts nothing on a device, so an absent GPU is fine, but a misspelt --device is an error."""
    assert_user_error(run("info", "-c", cond_ckpt, "--device", "tpu"), "--device tpu", "cuda:N")
    assert run("info", "-c", cond_ckpt, "--device", "cpu", "--json").exit_code == 0


def test_labels_file_sets_the_number_of_images_like_noise_does(cond_ckpt, tmp_path):
    """`sample --labels y.npy` used to fail with "holds 5 labels for 64 images" unless -n was repeated."""
    np.save(tmp_path / "y.npy", np.array([0, 2, 1, 1, -1]))
    r = run("sample", "-c", cond_ckpt, "--labels", tmp_path / "y.npy", "--out", tmp_path / "s.npz")
    assert r.exit_code == 0, r.stderr
    with np.load(tmp_path / "s.npz") as z:
        assert list(z["labels"]) == [0, 2, 1, 1, -1] and len(z["arr_0"]) == 5
    assert_user_error(run("sample", "-c", cond_ckpt, "-n", 3, "--labels", tmp_path / "y.npy"), "5 labels for 3 images")


def test_noise_files_of_the_wrong_kind_say_what_they_hold(cond_ckpt, tmp_path):
    np.save(tmp_path / "int.npy", np.ones((2, 4, 4), np.int64))
    bad = np.zeros((3, 4, 4), np.float32)
    bad[1, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    assert_user_error(
        run("sample", "-c", cond_ckpt, "--noise", tmp_path / "int.npy"), "int.npy", "int64", "floating-point"
    )
    assert_user_error(run("sample", "-c", cond_ckpt, "--noise", tmp_path / "nan.npy"), "nan.npy", "1 of 3 rows")


def test_float_inputs_far_outside_model_space_are_warned_about(cond_ckpt, tmp_path):
    """0..255 pixels saved as float32 would be scored as model-space values (a huge nll) without a word."""
    c = load_model(cond_ckpt).config
    np.save(tmp_path / "pixels.npy", np.full((2, c.in_channels, c.img_size, c.img_size), 200.0, np.float32))
    np.save(tmp_path / "model.npy", np.full((2, c.in_channels, c.img_size, c.img_size), 1.5, np.float32))
    for cmd, extra in (("score", []), ("denoise", ["--out", tmp_path / "d.npy"])):
        r = run(cmd, "-c", cond_ckpt, tmp_path / "pixels.npy", *extra)
        assert r.exit_code == 0 and "warning" in r.stderr and "uint8" in r.stderr, (cmd, r.stderr)
        r = run(cmd, "-c", cond_ckpt, tmp_path / "model.npy", *extra)
        assert r.exit_code == 0 and "warning" not in r.stderr, (cmd, r.stderr)


@pytest.mark.parametrize("command", ["sample", "score", "denoise", "eval"])
def test_a_seed_torch_cannot_take_is_a_usage_error(cond_ckpt, command):
    """--seed 2**70 used to end in 'Overflow when unpacking long long' from the generator."""
    assert_user_error(
        run(command, "-c", cond_ckpt, *(["-"] if command in ("score", "denoise") else []), "--seed", 2**70),
        "--seed",
        str(2**70),
    )


# ------------------------------------------------------ unreadable folder images, model-shaped arrays


def _folder_with_a_corrupt_image(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, name in enumerate(("a.png", "c.png")):
        Image.fromarray(np.full((4, 4), 60 * i, np.uint8)).save(folder / name)
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def test_score_and_denoise_skip_unreadable_folder_images_as_train_does(tmp_path):
    """One warning names the bad file; the good ones are scored with their index and source;
    --strict refuses."""
    ckpt = save_checkpoint(tmp_path / "ck", tiny_model(dtype=torch.float32), noise={"type": "gaussian", "std": 0.1})
    folder = _folder_with_a_corrupt_image(tmp_path)
    scored = run("score", "-c", ckpt, folder, "-f", "jsonl")
    assert scored.exit_code == 0, scored.stderr
    recs = [json.loads(line) for line in scored.stdout.splitlines()]
    assert [(r["index"], r["source"]) for r in recs] == [(0, str(folder / "a.png")), (1, str(folder / "c.png"))]
    warnings = [line for line in scored.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "1 unreadable image file skipped" in warnings[0] and "b.png" in warnings[0]
    assert "scored 2 images" in scored.stderr
    den = run("denoise", "-c", ckpt, folder, "--out", tmp_path / "d.npz")
    assert den.exit_code == 0, den.stderr
    assert "1 unreadable image file skipped" in den.stderr and "b.png" in den.stderr
    meta = json.loads(str(np.load(tmp_path / "d.npz")["tarflow_meta"]))
    assert meta["sources"] == [str(folder / "a.png"), str(folder / "c.png")] and meta["skipped"] == [
        str(folder / "b.png")
    ]
    for command in (["score", "-f", "jsonl"], ["denoise", "--out", tmp_path / "s.npz"]):
        assert_user_error(run(command[0], "-c", ckpt, folder, "--strict", *command[1:]), "b.png")


def test_scoring_one_image_says_image(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ck", tiny_model(dtype=torch.float32))
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 4, 4), np.float32))
    r = run("score", "-c", ckpt, tmp_path / "x.npy", "-f", "jsonl")
    assert r.exit_code == 0 and "scored 1 image:" in r.stderr, r.stderr


def test_an_array_of_the_models_shape_is_its_input_whatever_its_channel_count(tmp_path):
    """A 2-channel model takes (N, 2, H, W) arrays, float and uint8, in score and denoise."""
    model = tiny_model(dtype=torch.float32, in_channels=2, img_size=4, patch_size=2)
    ckpt = save_checkpoint(tmp_path / "ck", model, noise={"type": "gaussian", "std": 0.1})
    x = np.random.default_rng(0).uniform(-1, 1, (6, 2, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "u.npy", np.zeros((3, 2, 4, 4), np.uint8))
    r = run("score", "-c", ckpt, tmp_path / "x.npy", "-f", "jsonl")
    assert r.exit_code == 0, r.stderr
    got = [json.loads(line)["nll"] for line in r.stdout.splitlines()]
    assert np.allclose(got, nll(model, torch.from_numpy(x)).numpy(), atol=1e-5)
    assert run("score", "-c", ckpt, tmp_path / "u.npy", "-f", "jsonl").exit_code == 0
    d = run("denoise", "-c", ckpt, tmp_path / "x.npy", "--out", tmp_path / "d.npy")
    assert d.exit_code == 0, d.stderr
    assert np.load(tmp_path / "d.npy").shape == (6, 2, 4, 4)
    np.save(tmp_path / "five.npy", np.zeros((2, 5, 4, 4), np.float32))  # neither an image nor the model's
    assert_user_error(run("score", "-c", ckpt, tmp_path / "five.npy"), "five.npy")


def test_tiny_times_per_image_stay_readable():
    from tarflow_cli.commands.common import key_values, per_image

    assert per_image(0.0041) == "0.004 s" and per_image(0.00025) == "0.25 ms" and per_image(4e-7) == "0.4 µs"
    assert (
        key_values({"sampler": "gs-jacobi", "segments": [4, 2], "tol": None})
        == "sampler=gs-jacobi segments=4,2 tol=None"
    )


def test_sampling_one_image_says_image(cond_ckpt, tmp_path):
    r = run("sample", "-c", cond_ckpt, "-n", 1, "--out", tmp_path / "one.npy", "-v")
    assert r.exit_code == 0, r.stderr
    assert "sampled 1 image in" in r.stderr and "guidance=0.0 guide_what=ab" in r.stderr


# ------------------------------------------------------------------------------ help at 80 columns


def test_the_groups_own_help_shows_flags_as_flags():
    r = runner.invoke(app, ["--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert r.exit_code == 0 and "--version" in r.output and "<bool>" not in r.output, r.output


@pytest.mark.parametrize("command", ["train", "sample", "eval", "score", "denoise", "info", "watch", "export-tb"])
def test_help_reads_well_at_80_columns(command):
    """Nothing cut with '…', examples indented alike and never wrapped mid-command (a long one goes on
    a `\\` continuation line), defaults shown one way, flags without a `<bool>` value, mps wherever
    --device is, and no option that does nothing."""
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert r.exit_code == 0, r.output
    text = r.output
    lines = text.splitlines()
    assert "…" not in text and max(map(len, lines)) <= 80
    assert "(default:" not in text
    assert [line for line in lines if "<bool>" in line] == []  # --help too
    assert "range" not in text and "[x>=" not in text  # range types: checked by the parsers, worded as train's
    examples = lines[lines.index(next(line for line in lines if line.strip() == "Examples:")) + 1 :]
    examples = [line.rstrip() for line in examples[: next(i for i, x in enumerate(examples) if "╭" in x)]]
    shown = [line for line in examples if line]
    assert shown and all(line.startswith(("   tarflow ", "   torchrun ", "     ")) for line in shown), shown
    for before, line in zip(examples, examples[1:]):
        if line.startswith("     "):  # a continuation follows a line that asks for one
            assert before.endswith("\\"), (before, line)
    if "--device" in text:
        assert "mps" in text
    if command in ("info", "watch"):
        assert "--device" not in text and "--seed" not in text
    if command == "denoise":
        assert "--seed" not in text and "--device" in text


def test_options_that_do_nothing_are_still_accepted(cond_ckpt, tmp_path):
    """Hidden from the help, not refused: scripts that pass --seed/--device to every command keep working."""
    assert run("info", "--ckpt", cond_ckpt, "--seed", 3, "--device", "cpu", "--json").exit_code == 0


def test_out_of_range_values_are_worded_as_train_words_them():
    r = run("sample", "-c", "x", "-b", 0)
    assert r.exit_code == 2 and "--batch-size" in r.stderr and "must be a positive integer (got 0)" in r.stderr
    r = run("score", "-c", "x", "x.npy", "--dequant-samples", 0)
    assert r.exit_code == 2 and "must be a positive integer (got 0)" in r.stderr
    r = run("train", "--batch-size", 0)
    assert r.exit_code == 2 and "must be a positive integer (got 0)" in r.stderr
    r = run("train", "--micro-batch", 0)
    assert r.exit_code == 2 and "must be a positive integer or 'auto' (got 0)" in r.stderr


def test_the_quick_tour_uses_the_run_directory_its_train_command_makes():
    """Pasted in order, the tour's commands find the run: every --ckpt and watch names the --run-dir."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    tour = readme.split("## Quick tour", 1)[1].split("\n## ", 1)[0]
    commands = [line[2:] for line in tour.splitlines() if line.startswith("$ tarflow")]
    train = next(c for c in commands if c.startswith("tarflow train"))
    run_dir = re.search(r"--run-dir (\S+)", train).group(1)
    used = re.findall(r"--ckpt ([^\s`]+)", tour) + re.findall(r"tarflow watch ([^\s`]+)", tour)
    assert used and set(used) == {run_dir}, (run_dir, used)
