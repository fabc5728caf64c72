"""Reference `.pth` files of many shapes and modes: architecture read off the file alone, and the
published code's own outputs reproduced (float32 to rounding, float64 tightly).

The fixtures in tests/fixtures/reference/ were written by tools/make_reference_fixtures.py with the
published `transformer_flow.py` (see its docstring); these tests need only the files. Each model is
stored xz-compressed and unpacked under its own file name, since the name is part of the format.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tarflow_core.checkpoint import load_checkpoint, read_info
from tarflow_core.config import ModelConfig
from tarflow_core.likelihood import denoise, log_prob, nll

HERE = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
MANIFEST = json.loads((HERE / "manifest.json").read_text())
FILES = [m["file"] for m in MANIFEST]
BY_FILE = {m["file"]: m for m in MANIFEST}
MODES = [(m["file"], mode) for m in MANIFEST for mode in m["modes"]]
# float32 agreement: forward outputs are O(1); samples go through T sequential steps per block
# (measured: about 1e-6 in float32 and 1e-15 in float64 everywhere)
TOL = {
    "f32": dict(z=1e-5, logdet=1e-6, log_prob=1e-3, sample=2e-5, denoised=2e-5),
    "f64": dict(z=1e-12, logdet=1e-13, log_prob=1e-10, sample=1e-12, denoised=1e-12),
}
DTYPES = {"f32": torch.float32, "f64": torch.float64}


def unpack(file: str, folder: Path, name: str | None = None) -> Path:
    target = folder / (name or file)
    target.write_bytes(lzma.decompress((HERE / f"{file}.xz").read_bytes()))
    return target


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    for file in FILES:
        unpack(file, folder)
    return folder


_models: dict = {}


def model_for(unpacked: Path, file: str, tag: str):
    key = (file, tag)
    if key not in _models:
        _models[key] = load_checkpoint(unpacked / file)[0].to(DTYPES[tag])
    return _models[key]


def expected_for(file: str) -> dict:
    return torch.load(HERE / f"{file}.expected.pt", weights_only=True)


def worst(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("file", FILES)
def test_architecture_and_noise_are_read_off_the_file_alone(unpacked, file):
    meta = BY_FILE[file]
    model, info = load_checkpoint(unpacked / file)
    assert info.kind == "reference"
    assert info.config == ModelConfig(**meta["config"])
    assert info.noise == meta["noise"]
    assert model.num_parameters() == meta["parameters"] == info.config.num_parameters()
    assert read_info(unpacked / file).config == info.config


@pytest.mark.parametrize("tag", ["f32", "f64"])
@pytest.mark.parametrize("file", FILES)
def test_forward_logdet_and_log_prob_match_the_reference(unpacked, file, tag):
    exp, model, tol = expected_for(file), model_for(unpacked, file, tag), TOL[tag]
    c = model.config
    x = exp["x"].to(DTYPES[tag])
    cases = [("", exp.get("y"))]
    if c.conditional:
        cases += [("_dropped", exp["y_dropped"]), ("_nolabel", None)]
    with torch.no_grad():
        for suffix, y in cases:
            z, logdet = model(x, y)
            assert z.dtype == DTYPES[tag]
            assert worst(z, exp[f"{tag}/z{suffix}"]) < tol["z"], suffix
            # the reference reports the per-dimension mean; ours is the total in nats
            assert worst(logdet / (c.num_patches * c.token_dim), exp[f"{tag}/logdets{suffix}"]) < tol["logdet"], suffix
        y = exp.get("y")
        assert worst(log_prob(model, x, y), exp[f"{tag}/log_prob"]) < tol["log_prob"]
        assert worst(nll(model, x, y), -exp[f"{tag}/log_prob"] / c.data_dim) < tol["log_prob"] / c.data_dim


@pytest.mark.parametrize("tag", ["f32", "f64"])
@pytest.mark.parametrize("file,mode", MODES)
def test_samples_match_the_reference_in_every_guidance_mode(unpacked, file, mode, tag):
    exp, model = expected_for(file), model_for(unpacked, file, tag)
    options = dict(BY_FILE[file]["modes"][mode])
    y = None if options.pop("no_labels", False) else exp.get("y")
    x = model.sample(exp["noise"].to(DTYPES[tag]), y, **options)
    assert x.dtype == DTYPES[tag]
    assert worst(x, exp[f"{tag}/sample/{mode}"]) < TOL[tag]["sample"]


@pytest.mark.parametrize("sampler", [dict(sampler="jacobi"), dict(sampler="gs-jacobi", segments=3)])
@pytest.mark.parametrize("file", FILES)
def test_parallel_samplers_reach_the_reference_samples(unpacked, file, sampler):
    """Jacobi and Gauss-Seidel-Jacobi converge to the sequential (reference) result, float64, guided."""
    exp, model = expected_for(file), model_for(unpacked, file, "f64")
    mode, options = list(BY_FILE[file]["modes"].items())[-1]
    options = dict(options)
    y = None if options.pop("no_labels", False) else exp.get("y")
    x = model.sample(exp["noise"].double(), y, **options, **sampler, tol=1e-13)
    assert worst(x, exp[f"f64/sample/{mode}"]) < 1e-12


@pytest.mark.parametrize("tag", ["f32", "f64"])
@pytest.mark.parametrize("file", FILES)
def test_denoising_step_matches_autograd_through_the_reference(unpacked, file, tag):
    exp, model = expected_for(file), model_for(unpacked, file, tag)
    sigma = BY_FILE[file]["sigma"]
    out = denoise(model, exp[f"{tag}/sample/g0"], exp.get("y"), sigma=sigma)
    assert worst(out, exp[f"{tag}/denoised"]) < TOL[tag]["denoised"]


# ------------------------------------------------------------------- names, extensions, wrappers


@pytest.mark.parametrize("file", FILES)
def test_a_name_without_the_pattern_gives_the_same_model(tmp_path, file):
    """No patch size in the name: channels and patch size from the token size alone."""
    path = unpack(file, tmp_path, "downloaded weights.pth")
    meta = BY_FILE[file]
    info = read_info(path)
    assert info.config == ModelConfig(**meta["config"])
    assert info.noise == {"type": None, "std": None}


@pytest.mark.parametrize(
    "name", ["mnist_model_4_64_3_1_0.10.pt", "run3_mnist_model_4_64_3_1_0.10.pth", "mnist_model_4_64_3_1_0.10.bin"]
)
def test_other_extensions_and_dataset_names_keep_patch_and_noise(tmp_path, name):
    path = unpack("mnist_model_4_64_3_1_0.10.pth", tmp_path, name)
    info = read_info(path)
    assert info.config == ModelConfig(**BY_FILE["mnist_model_4_64_3_1_0.10.pth"]["config"])
    assert info.noise == {"type": "gaussian", "std": 0.1}


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_ddp_and_compile_prefixes_load_the_same_function(unpacked, tmp_path, prefix):
    file = "imagenet_model_4_64_2_1_0.15.pth"
    state = torch.load(unpacked / file, weights_only=True)
    torch.save({prefix + k: v for k, v in state.items()}, tmp_path / file)
    model, info = load_checkpoint(tmp_path / file)
    assert info.config == ModelConfig(**BY_FILE[file]["config"])
    exp = expected_for(file)
    with torch.no_grad():
        assert worst(model(exp["x"])[0], exp["f32/z"]) < TOL["f32"]["z"]
    assert torch.equal(model.var, state["var"])  # the learned VP prior came along


def test_a_half_precision_state_dict_loads_as_float32(unpacked, tmp_path):
    """Weights saved after `model.half()`/`.bfloat16()` (these fixtures' values are exact in both)."""
    file = "cifar10_model_2_64_2_1_uniform.pth"
    state = torch.load(unpacked / file, weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / file)
    model = load_checkpoint(tmp_path / file)[0]
    assert model.var.dtype == torch.float32
    exp = expected_for(file)
    with torch.no_grad():
        assert worst(model(exp["x"])[0], exp["f32/z"]) < TOL["f32"]["z"]


# ------------------------------------------------------------------------------------------ CLI

runner = CliRunner()


def _cli(args):
    from tarflow_cli.main import app

    return runner.invoke(app, args, catch_exceptions=False)


def test_cli_info_json_describes_a_vp_reference_file(unpacked):
    file = "mnist_model_4_64_3_1_0.10.pth"
    result = _cli(["info", "--ckpt", str(unpacked / file), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    text = json.dumps(info)
    for value in ('"nvp": false', '"num_classes": 10', '"patch_size": 4', '"img_size": 12', '"in_channels": 1'):
        assert value in text, value
    assert "0.1" in text


def test_cli_score_and_sample_reproduce_the_reference(unpacked, tmp_path):
    file = "mnist_model_4_64_3_1_0.10.pth"
    exp, ckpt = expected_for(file), str(unpacked / file)
    np.save(tmp_path / "x.npy", exp["x"].numpy())
    np.save(tmp_path / "y.npy", exp["y"].numpy())
    result = _cli(
        ["score", "--ckpt", ckpt, str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--format", "jsonl"]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    want = (-exp["f32/log_prob"] / (1 * 12 * 12)).tolist()
    assert [r["nll"] for r in records] == pytest.approx(want, abs=2e-5)
    np.save(tmp_path / "noise.npy", exp["noise"].numpy())
    for extra, key in ((["--no-denoise", "--guidance", "2"], "f32/sample/g2_ab"), ([], "f32/denoised")):
        out = tmp_path / f"s{len(extra)}.npy"
        result = _cli(
            [
                "sample",
                "--ckpt",
                ckpt,
                "--noise",
                str(tmp_path / "noise.npy"),
                "--labels",
                str(tmp_path / "y.npy"),
                "--sampler",
                "sequential",
                "--out",
                str(out),
                *extra,
            ]
        )
        assert result.exit_code == 0, result.output
        # default --denoise is on for a Gaussian-noise checkpoint: one step with the name's std
        assert worst(torch.from_numpy(np.load(out)), exp[key]) < TOL["f32"]["sample"], key


def test_fixture_set_is_small_and_covers_the_shapes():
    total = sum(f.stat().st_size for f in HERE.iterdir())
    assert total < 800_000
    configs = [ModelConfig(**m["config"]) for m in MANIFEST]
    assert {c.patch_size for c in configs} >= {1, 2, 4, 8}
    assert {c.in_channels for c in configs} == {1, 3}
    assert {c.nvp for c in configs} == {True, False} and any(c.num_classes == 1000 for c in configs)
    assert any(c.num_blocks % 2 for c in configs) and any(c.layers_per_block > 1 for c in configs)


@pytest.mark.parametrize("file", ["mnist_model_4_64_3_1_0.10.pth", "my_flow.pt"])
def test_conversion_to_native_keeps_the_function_var_and_noise(unpacked, tmp_path, file):
    from tarflow_core.checkpoint import convert_reference

    native = convert_reference(unpacked / file, tmp_path / "native")
    model, info = load_checkpoint(native)
    assert info.kind == "native" and info.config == ModelConfig(**BY_FILE[file]["config"])
    assert info.noise == BY_FILE[file]["noise"]
    exp = expected_for(file)
    assert torch.equal(model.var, load_checkpoint(unpacked / file)[0].var)
    with torch.no_grad():
        assert worst(model(exp["x"], exp.get("y"))[0], exp["f32/z"]) < TOL["f32"]["z"]


def test_the_state_dict_saved_as_safetensors_loads_the_same(unpacked, tmp_path):
    """Model hubs hold converted .pth files as .safetensors: same tensors, same name convention."""
    from safetensors.torch import save_file

    file = "mnist_model_4_64_3_1_0.10.pth"
    state = torch.load(unpacked / file, weights_only=True)
    path = tmp_path / "mnist_model_4_64_3_1_0.10.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model, info = load_checkpoint(path)
    assert info.kind == "reference" and info.config == ModelConfig(**BY_FILE[file]["config"])
    assert info.noise == {"type": "gaussian", "std": 0.1}
    exp = expected_for(file)
    with torch.no_grad():
        assert worst(model(exp["x"], exp["y"])[0], exp["f32/z"]) < TOL["f32"]["z"]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_labels_of_any_integer_type_are_class_indices(unpacked, dtype):
    """uint8 labels (e.g. read from a uint8 .npy) indexed as a boolean mask: an error, or silently other
    classes when every label is non-zero and there are as many as classes."""
    file = "mnist_model_4_64_3_1_0.10.pth"
    exp, model = expected_for(file), model_for(unpacked, file, "f32")
    y = exp["y"].to(dtype)
    with torch.no_grad():
        assert worst(model(exp["x"], y)[0], exp["f32/z"]) < TOL["f32"]["z"]
    assert worst(model.sample(exp["noise"], y, guidance=2.0), exp["f32/sample/g2_ab"]) < TOL["f32"]["sample"]
    ten = torch.arange(1, 11).clamp(max=9).to(dtype)  # 10 non-zero labels for 10 classes: a full mask
    noise = exp["noise"][:1].expand(10, -1, -1)
    assert torch.equal(model.sample(noise, ten), model.sample(noise, ten.long()))
