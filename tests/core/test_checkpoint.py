"""Native checkpoint round trips, reference .pth import, and refusal of unsafe or broken files."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch

from tarflow_core.checkpoint import (
    CheckpointError,
    convert_reference,
    latest_checkpoint,
    load_checkpoint,
    read_info,
    resolve_checkpoint,
    save_checkpoint,
)
from tarflow_core.config import ModelConfig
from tarflow_core.model import TarFlow
from tests.conftest import tiny_model


class _Marker:
    """Unpickling this would create a file: proof that loading ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _same_function(a: TarFlow, b: TarFlow, y=None) -> None:
    c = a.config
    x = torch.randn(2, c.in_channels, c.img_size, c.img_size)
    za, la = a(x, y)
    zb, lb = b(x, y)
    assert torch.equal(za, zb) and torch.equal(la, lb)


def test_native_round_trip(tmp_path):
    model = tiny_model(dtype=torch.float32, var=True, nvp=False, num_classes=3)
    path = save_checkpoint(
        tmp_path / "ck",
        model,
        noise={"type": "gaussian", "std": 0.1},
        step=42,
        data={"channels": 1, "image_size": 4, "num_classes": 3, "class_names": ["a", "b", "c"]},
    )
    loaded, info = load_checkpoint(path)
    assert info.config == model.config and info.step == 42 and info.noise_std == 0.1
    assert info.data["class_names"] == ["a", "b", "c"]
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    _same_function(model, loaded, torch.tensor([0, 2]))
    raw = json.loads((path / "config.json").read_text())
    assert raw["model"]["nvp"] is False and raw["tarflow_version"]


def test_overwriting_a_checkpoint_is_atomic_and_leaves_no_temporaries(tmp_path):
    first, second = tiny_model(seed=1, dtype=torch.float32), tiny_model(seed=2, dtype=torch.float32)
    save_checkpoint(tmp_path / "ck", first, step=1)
    save_checkpoint(tmp_path / "ck", second, step=2)
    loaded, info = load_checkpoint(tmp_path / "ck")
    assert info.step == 2
    _same_function(second, loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    good = tiny_model(seed=1, dtype=torch.float32)
    save_checkpoint(tmp_path / "ck", good, step=1)
    import tarflow_core.checkpoint as ckmod

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckmod, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", tiny_model(seed=2, dtype=torch.float32), step=2)
    loaded, info = load_checkpoint(tmp_path / "ck")
    assert info.step == 1
    _same_function(good, loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_run_directory_resolves_to_its_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (5, 20, 100):
        save_checkpoint(run / "checkpoints" / f"step-{step:08d}", tiny_model(seed=step, dtype=torch.float32), step=step)
    (run / "checkpoints" / "step-00000200").mkdir()  # half-written: no files yet
    assert latest_checkpoint(run).name == "step-00000100"
    assert read_info(run).step == 100
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(empty)


def test_reference_pth_converts_to_native_with_the_same_function(fixtures_dir, tmp_path):
    ref, info = load_checkpoint(fixtures_dir / "cond_nvp.pth")
    assert info.kind == "reference"
    assert info.config == ModelConfig(
        in_channels=3,
        img_size=8,
        patch_size=2,
        width=128,
        num_blocks=4,
        layers_per_block=2,
        head_dim=64,
        expansion=4,
        nvp=True,
        num_classes=10,
    )
    assert info.config.num_parameters() == ref.num_parameters()
    native = convert_reference(fixtures_dir / "cond_nvp.pth", tmp_path / "native")
    loaded, ninfo = load_checkpoint(native)
    assert ninfo.kind == "native" and ninfo.config == info.config
    _same_function(ref, loaded, torch.tensor([3, -1]))


def _reference_state(cfg: ModelConfig) -> dict:
    """A state dict as the published code writes it (with the causal-mask buffers)."""
    model = TarFlow(cfg)
    state = dict(model.state_dict())
    for i in range(cfg.num_blocks):
        state[f"blocks.{i}.attn_mask"] = torch.tril(torch.ones(cfg.num_patches, cfg.num_patches))
    return state


@pytest.mark.parametrize(
    "name,patch,channels,noise",
    [
        ("afhq_model_8_128_2_1_0.07.pth", 8, 3, {"type": "gaussian", "std": 0.07}),
        ("imagenet64_model_2_128_2_1_uniform.pth", 2, 3, {"type": "uniform", "std": None}),
        ("mnist_model_4_128_2_1_0.10.pth", 4, 1, {"type": "gaussian", "std": 0.1}),
        ("cifar_model_4_128_2_1_0.00.pth", 4, 3, {"type": None, "std": None}),  # --noise_std 0: no noise
        ("x_model_4_128_2_1_1.2.3.pth", 4, 3, {"type": None, "std": None}),  # not a number: name ignored
    ],
)
def test_reference_file_names_give_patch_size_and_noise(tmp_path, name, patch, channels, noise):
    cfg = ModelConfig(
        in_channels=channels,
        img_size=patch * 4,
        patch_size=patch,
        width=128,
        num_blocks=2,
        layers_per_block=1,
        head_dim=64,
        nvp=name.startswith("afhq"),
        num_classes=3 if name.startswith("afhq") else 0,
    )
    torch.save(_reference_state(cfg), tmp_path / name)
    info = read_info(tmp_path / name)
    assert info.config == cfg and info.noise == noise


def test_published_afhq_architecture_is_read_off_shapes_and_name(tmp_path):
    """afhq_model_8_768_8_8_0.07.pth: patch 8, width 768, 8x8, noise 0.07, 3 classes, 256x256 (shapes only)."""
    cfg = ModelConfig(
        in_channels=3,
        img_size=256,
        patch_size=8,
        width=768,
        num_blocks=8,
        layers_per_block=8,
        head_dim=64,
        nvp=True,
        num_classes=3,
    )
    T, D, W = cfg.num_patches, cfg.token_dim, cfg.width
    state = {"var": torch.ones(T, D)}
    for i in range(8):  # zero-stride tensors: the real shapes without the 1.8 GB of memory
        state[f"blocks.{i}.proj_in.weight"] = torch.zeros(1).expand(W, D)
        state[f"blocks.{i}.pos_embed"] = torch.zeros(1).expand(T, W)
        state[f"blocks.{i}.class_embed"] = torch.zeros(1).expand(3, 1, W)
        state[f"blocks.{i}.proj_out.weight"] = torch.zeros(1).expand(2 * D, W)
        for j in range(8):
            state[f"blocks.{i}.attn_blocks.{j}.mlp.main.0.weight"] = torch.zeros(1).expand(4 * W, W)
    from tarflow_core.checkpoint import reference_info

    info = reference_info(state, pathlib.Path("afhq_model_8_768_8_8_0.07.pth"))
    assert info.config == cfg
    assert info.noise_std == 0.07 and info.data["source"] == "afhq"


def test_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"var": torch.ones(1), "payload": _Marker(marker)}, evil)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content,says",
    [
        (b"", "is empty"),
        (b"not a torch file at all", "not a PyTorch file"),
        (b"PK\x03\x04truncated zip", "not a readable PyTorch state dict"),
        (b'{"json": 1}', "not a PyTorch file"),
    ],
)
def test_corrupt_pth_is_a_clear_error(tmp_path, content, says):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pth") as err:
        load_checkpoint(bad)
    assert "pickled Python objects" not in str(err.value) and says in str(err.value)


def test_corrupt_native_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "ck", tiny_model(dtype=torch.float32))
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path)
    shutil.rmtree(path)
    path = save_checkpoint(tmp_path / "ck", tiny_model(dtype=torch.float32))
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(path)


def test_the_checkpoints_folder_of_a_run_means_its_newest(tmp_path):
    model = tiny_model(dtype=torch.float32)
    for step in (5, 12):
        save_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{step:08d}", model, step=step)
    assert resolve_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000012"


def test_missing_and_non_checkpoint_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(tmp_path)
    torch.save({"weight": torch.ones(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a TarFlow state dict"):
        load_checkpoint(tmp_path / "other.pth")


def test_wrapper_prefixes_in_any_order_are_stripped(tmp_path):
    cfg = ModelConfig(
        in_channels=1,
        img_size=8,
        patch_size=4,
        width=64,
        num_blocks=2,
        layers_per_block=1,
        head_dim=64,
        nvp=True,
        num_classes=2,
    )
    state = _reference_state(cfg)
    for prefix in ("module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod."):
        torch.save({prefix + k: v for k, v in state.items()}, tmp_path / "m.pth")
        assert load_checkpoint(tmp_path / "m.pth", patch_size=4)[1].config == cfg, prefix


def test_info_refuses_weights_that_do_not_fit_the_architecture(tmp_path):
    cfg = ModelConfig(
        in_channels=1,
        img_size=8,
        patch_size=4,
        width=64,
        num_blocks=2,
        layers_per_block=1,
        head_dim=64,
        nvp=True,
        num_classes=0,
    )
    state = _reference_state(cfg)
    state["blocks.0.extra"] = torch.ones(2)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected: blocks.0.extra"):
        read_info(tmp_path / "extra.pth", patch_size=4)
    del state["blocks.0.extra"], state["blocks.1.proj_out.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing: blocks.1.proj_out.bias"):
        read_info(tmp_path / "missing.pth", patch_size=4)
    with pytest.raises(CheckpointError, match="patch size 0: expected a positive integer"):
        read_info(tmp_path / "missing.pth", patch_size=0)


# ---------------------------------------------- reference files: what the shapes and names give

SMALL = dict(width=64, num_blocks=1, layers_per_block=1, head_dim=64)


@pytest.mark.parametrize("channels,patch", [(3, 2), (3, 4), (3, 1), (1, 2), (1, 4), (1, 1), (1, 3), (3, 3)])
def test_channels_and_patch_from_the_token_size_alone(tmp_path, channels, patch):
    """No patch size in the name: D = 12 and 48 are RGB (not 12 or 48 channels), D = 4, 16, 9 gray."""
    cfg = ModelConfig(in_channels=channels, img_size=patch * 3, patch_size=patch, **SMALL)
    torch.save(_reference_state(cfg), tmp_path / "weights.pth")
    assert read_info(tmp_path / "weights.pth").config == cfg


@pytest.mark.parametrize(
    "change,says",
    [
        (dict(tokens=12), "12 tokens do not form a square image"),
        (dict(token_dim=8), "cannot tell channels and patch size from token size 8; give the patch size"),
        (dict(width=96), "width 96 is not a multiple of the reference head size 64"),
        (dict(out=5), "proj_out has 5 outputs, expected 4 (VP) or 8 (NVP)"),
        (dict(drop="var"), "no tensor 'var'"),
    ],
)
def test_reference_shapes_that_fit_no_model_are_one_sentence(tmp_path, change, says):
    T, D, W = change.get("tokens", 9), change.get("token_dim", 4), change.get("width", 64)
    state = {
        "var": torch.ones(T, D),
        "blocks.0.proj_in.weight": torch.zeros(W, D),
        "blocks.0.pos_embed": torch.zeros(T, W),
        "blocks.0.attn_blocks.0.mlp.main.0.weight": torch.zeros(4 * W, W),
        "blocks.0.proj_out.weight": torch.zeros(change.get("out", 2 * D), W),
    }
    state.pop(change.get("drop", ""), None)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="odd.pth") as err:
        read_info(tmp_path / "odd.pth")
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_patch_size_clashing_with_the_file_name_is_refused(tmp_path):
    """--patch-size 2 on a patch-4 file would silently read 1x12x12 images as 4x6x6."""
    cfg = ModelConfig(in_channels=1, img_size=12, patch_size=4, **SMALL)
    path = tmp_path / "mnist_model_4_64_1_1_0.10.pth"
    torch.save(_reference_state(cfg), path)
    assert read_info(path, patch_size=4).config == cfg
    with pytest.raises(CheckpointError, match="its name gives patch size 4, not the 2 asked for"):
        load_checkpoint(path, patch_size=2)


def test_a_name_disagreeing_with_the_tensors_says_both(tmp_path):
    cfg = ModelConfig(in_channels=1, img_size=12, patch_size=4, **SMALL)
    torch.save(_reference_state(cfg), tmp_path / "mnist_model_4_64_2_1_0.10.pth")
    with pytest.raises(
        CheckpointError,
        match="names width 64, 2 blocks, 1 layer per block but its tensors hold width 64, 1 block, 1 layer per block",
    ):
        read_info(tmp_path / "mnist_model_4_64_2_1_0.10.pth")


@pytest.mark.parametrize(
    "name,source",
    [
        ("imagenet-64_model_4_64_1_1_0.05.pth", "imagenet-64"),
        ("my_faces_model_4_64_1_1_uniform.pt", "my_faces"),
        ("model_4_64_1_1_0.05.pth", None),
    ],
)
def test_the_whole_dataset_part_of_the_name_is_the_source(tmp_path, name, source):
    cfg = ModelConfig(in_channels=3, img_size=8, patch_size=4, **SMALL)
    torch.save(_reference_state(cfg), tmp_path / name)
    info = read_info(tmp_path / name)
    assert info.config == cfg and info.data.get("source") == source


def test_the_published_optimizer_file_is_named_as_such(tmp_path):
    opt = {
        "optimizer": {
            "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}},
            "param_groups": [{"lr": 1e-4, "params": [0]}],
        },
        "lr_schedule": {"counter": 5},
    }
    torch.save(opt, tmp_path / "afhq_opt_8_768_8_8_0.07.pth")
    with pytest.raises(
        CheckpointError,
        match=r"optimizer state, not model weights; give its model file "
        r"\(afhq_model_8_768_8_8_0.07.pth\)",
    ):
        load_checkpoint(tmp_path / "afhq_opt_8_768_8_8_0.07.pth")


def test_a_state_dict_inside_a_training_dict_loads(tmp_path):
    cfg = ModelConfig(in_channels=1, img_size=8, patch_size=4, **SMALL)
    model = tiny_model(dtype=torch.float32)
    state = _reference_state(cfg)
    torch.save({"model": state, "epoch": 3, "args": {"lr": 1e-4}}, tmp_path / "m.pth")
    assert read_info(tmp_path / "m.pth", patch_size=4).config == cfg
    torch.save({"flow": state, "disc": {"w": torch.ones(2)}, "step": 7}, tmp_path / "m2.pth")
    assert read_info(tmp_path / "m2.pth", patch_size=4).config == cfg
    torch.save({"model": state, "ema": model.state_dict()}, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match=r"several state dicts \(model, ema\)"):
        read_info(tmp_path / "two.pth", patch_size=4)


def test_the_published_trainers_log_folder_names_the_weights_in_it(tmp_path):
    cfg = ModelConfig(in_channels=1, img_size=8, patch_size=4, **SMALL)
    torch.save(_reference_state(cfg), tmp_path / "mnist_model_4_64_1_1_0.10.pth")
    torch.save({"optimizer": {}, "lr_schedule": {}}, tmp_path / "mnist_opt_4_64_1_1_0.10.pth")
    with pytest.raises(
        CheckpointError,
        match=r"reference .pth file; it holds mnist_model_4_64_1_1_0.10.pth: "
        r"give the file$",
    ):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "mnist_model_4_64_1_1_0.10.pth.1",
        "mnist_model_4_64_1_1_0.10 (1).pth",
        "mnist_model_4_64_1_1_0.10-2.pth",
        "mnist_model_4_64_1_1_0.10.pt",
    ],
)
def test_downloaded_copies_keep_the_noise_the_name_gives(tmp_path, name):
    """wget saves a second download as .pth.1, browsers as ' (1)' / '-1': the noise std (which turns
    denoising on) and patch size are still read."""
    cfg = ModelConfig(in_channels=1, img_size=12, patch_size=4, **SMALL)
    torch.save(_reference_state(cfg), tmp_path / name)
    info = read_info(tmp_path / name)
    assert info.config == cfg and info.noise == {"type": "gaussian", "std": 0.1}
    assert info.data["source"] == "mnist"


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(
            in_channels=3,
            img_size=8,
            patch_size=2,
            width=64,
            num_blocks=3,
            layers_per_block=2,
            head_dim=32,
            expansion=2,
            nvp=True,
            num_classes=5,
        ),
        ModelConfig(in_channels=1, img_size=12, patch_size=4, width=64, num_blocks=1, layers_per_block=1, nvp=False),
    ],
)
def test_state_shapes_are_the_models(cfg):
    from tarflow_core.model import state_shapes

    assert state_shapes(cfg) == {k: tuple(v.shape) for k, v in TarFlow(cfg).state_dict().items()}


def test_info_reads_a_reference_file_without_building_the_model(tmp_path, monkeypatch):
    """`tarflow info` on a 1.8 GB reference file needs no second copy of the weights (and no meta device,
    whose first use costs seconds)."""
    import tarflow_core.checkpoint as ck

    cfg = ModelConfig(in_channels=1, img_size=12, patch_size=4, **SMALL)
    torch.save(_reference_state(cfg), tmp_path / "mnist_model_4_64_1_1_0.10.pth")
    monkeypatch.setattr(ck, "TarFlow", None)
    assert read_info(tmp_path / "mnist_model_4_64_1_1_0.10.pth").config == cfg


def test_a_patch_size_for_a_native_checkpoint_must_be_the_one_it_records(tmp_path):
    """--patch-size is for reference files; on a native checkpoint another value would be silently ignored."""
    model = tiny_model(dtype=torch.float32)
    path = save_checkpoint(tmp_path / "ck", model)
    assert load_checkpoint(path, patch_size=2)[1].config == model.config
    for call in (load_checkpoint, read_info):
        with pytest.raises(CheckpointError, match="records patch size 2, not the 4 asked for"):
            call(path, patch_size=4)


def test_loading_builds_no_random_weights(tmp_path):
    """The weights are the loaded tensors (no initialisation thrown away, no second copy), so loading
    leaves torch's random stream alone: `manual_seed; load_model; randn` draws what `manual_seed; randn` does."""
    path = save_checkpoint(tmp_path / "ck", tiny_model(dtype=torch.float64, var=True))
    torch.manual_seed(5)
    model, _ = load_checkpoint(path)
    drawn = torch.randn(4)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.randn(4))
    assert all(p.dtype == torch.float32 and p.requires_grad and not p.is_meta for p in model.parameters())
    assert model.var.dtype == torch.float32 and not model.var.is_meta


def test_the_resume_state_file_means_its_checkpoint(tmp_path):
    """--ckpt run/checkpoints/step-N/train_state.pt (tab-completed one file too far) is that checkpoint,
    not a reference file 'holding optimizer state'."""
    model = tiny_model(dtype=torch.float32)
    path = save_checkpoint(tmp_path / "ck", model)
    torch.save(
        {"format": "tarflow-train-state", "optimizer": {"state": {}, "param_groups": []}, "step": 3},
        path / "train_state.pt",
    )
    assert resolve_checkpoint(path / "train_state.pt") == path
    assert load_checkpoint(path / "train_state.pt")[1].kind == "native"


def test_weights_holding_nan_are_refused_by_name(tmp_path):
    """A diverged run's file (the published trainer saves every epoch) is told as such, not sampled into
    '... still non-finite after 10 redraws' or NaN scores."""
    cfg = ModelConfig(in_channels=1, img_size=8, patch_size=4, **SMALL)
    state = _reference_state(cfg)
    state["blocks.0.attn_blocks.0.mlp.main.0.weight"][3, 4] = float("nan")
    torch.save(state, tmp_path / "mnist_model_4_64_1_1_0.10.pth")
    with pytest.raises(
        CheckpointError, match=r"hold NaN or infinite values \(blocks.0.attn_blocks.0.mlp.main.0.weight\)"
    ):
        load_checkpoint(tmp_path / "mnist_model_4_64_1_1_0.10.pth")
    state = _reference_state(ModelConfig(in_channels=1, img_size=8, patch_size=4, nvp=False, **SMALL))
    state["var"][0, 0] = 0.0
    torch.save(state, tmp_path / "vp.pth")
    with pytest.raises(CheckpointError, match="'var' holds values <= 0"):
        load_checkpoint(tmp_path / "vp.pth", patch_size=4)


def test_a_missing_run_directory_names_the_newest_run_whose_name_starts_with_it(tmp_path):
    """`--ckpt runs/tiny` after `train` made `runs/tiny-<time>`: the error names the newest one."""
    import os

    model = tiny_model(dtype=torch.float32)
    for i, name in enumerate(("tiny-20260101-000000", "tiny-20260102-000000", "tinyx")):
        save_checkpoint(tmp_path / name / "checkpoints" / "step-00000001", model, step=1)
        (tmp_path / name / "events.jsonl").write_text("{}\n")
        os.utime(tmp_path / name / "events.jsonl", (1000 + i, 1000 + i))
    os.utime(tmp_path / "tinyx" / "events.jsonl", (10, 10))  # the oldest
    (tmp_path / "tiny-notes").mkdir()  # not a run
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "tiny")
    assert str(err.value) == (
        f"checkpoint {tmp_path / 'tiny'} does not exist; the newest run whose name starts with tiny is "
        f"{tmp_path / 'tiny-20260102-000000'}"
    )
    with pytest.raises(CheckpointError, match=r"nope does not exist$"):
        load_checkpoint(tmp_path / "nope")
