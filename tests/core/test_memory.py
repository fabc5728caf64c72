"""The memory plan (tarflow_core/memory.py): its activation count against autograd's saved tensors, its
training and denoising peaks against peaks measured in fresh processes, its arithmetic, and the paper
presets on an 80 GiB GPU."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tarflow_core import memory as M
from tarflow_core.config import ModelConfig
from tarflow_core.memory_calibration import measure_peak
from tarflow_core.model import Layer, TarFlow
from tarflow_core.presets import PRESETS
from tarflow_core.train.step import objective

PAPER = {"cifar10": 10, "imagenet64": 0, "imagenet64-cond": 1000, "imagenet128-cond": 1000, "afhq256": 3}


def rgb(img: int, width: int, blocks: int = 2, layers: int = 2, **kw) -> ModelConfig:
    return ModelConfig(in_channels=3, img_size=img, patch_size=2, width=width, num_blocks=blocks,
                       layers_per_block=layers, head_dim=64, **kw)  # fmt: skip


def saved_bytes(fn, params, bf16: bool) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs, less the weights and their bf16
    casts (the plan counts those apart), told by their shapes: no activation may share one."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    shapes = {s for p in params for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        cast = t.dtype == torch.bfloat16 and t.dim() <= 2 and tuple(t.shape) in shapes
        if storage.data_ptr() not in weights and not cast:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fn()
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_layer_activation_count_is_what_autograd_saves(precision):
    torch.manual_seed(0)
    cfg, B = ModelConfig(in_channels=3, img_size=16, patch_size=2, width=128, head_dim=64), 3  # 192 rows
    layer = Layer(cfg.width, cfg.head_dim, cfg.expansion)
    h = torch.randn(B, cfg.num_patches, cfg.width, requires_grad=True)
    planned = B * M.layer_activation_bytes(cfg, 4 if precision == "fp32" else 2)
    assert saved_bytes(lambda: layer(h), list(layer.parameters()), precision == "bf16") == planned


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_activation_count_is_close_to_what_autograd_saves(precision):
    torch.manual_seed(0)
    cfg = rgb(16, 128, num_classes=10)
    model, B = TarFlow(cfg), 4
    x, y = torch.randn(B, 3, 16, 16), torch.randint(0, 10, (B,))

    def step():
        z, logdet = model(x, y)
        return objective(z.float(), logdet, cfg.data_dim)

    saved = saved_bytes(step, list(model.parameters()), precision == "bf16")
    planned = B * M.training_activation_bytes(cfg, 4 if precision == "fp32" else 2)
    assert saved <= planned <= 1.03 * saved


# Three sizes (width and tokens growing) measured in fresh processes, two at a time (each uses one thread).
# bf16 autocast and checkpointing (the model's own) at the smallest size, where a step costs least.
SIZES = [(rgb(16, 128), 32), (rgb(32, 256), 12), (rgb(32, 384, layers=3), 8)]
CASES = [(cfg, b, what, "fp32", "off") for cfg, b in SIZES for what in ("training", "denoising")]
CASES += [(*SIZES[0], "training", "bf16", "off"), (*SIZES[0], "training", "fp32", "blocks")]


def planned_peak(cfg, batch, what, precision, checkpointing) -> int:
    if what == "training":
        return M.training_memory(cfg, batch, precision, checkpointing, device="cpu").peak
    return M.denoising_memory(cfg, batch, precision=precision, device="cpu").peak


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs (peak reset)"
)
def test_training_and_denoising_plans_are_within_25_percent_of_the_measured_peak():
    with ThreadPoolExecutor(2) as pool:
        measured = list(pool.map(lambda c: measure_peak(c[2], c[0], c[1], c[3], c[4]), CASES))
    rows = []
    for (cfg, batch, what, precision, ckpt), peak in zip(CASES, measured):
        ratio = planned_peak(cfg, batch, what, precision, ckpt) / peak
        rows.append(f"{cfg.short_name()} T={cfg.num_patches} b={batch} {what} {precision} {ckpt}: {ratio:.3f}")
        assert peak > batch * M.layer_activation_bytes(cfg, 4), "the measurement missed the activations"
    print("plan / measured:\n" + "\n".join(rows))
    assert all(0.75 <= float(r.rsplit(" ", 1)[1]) <= 1.25 for r in rows), "plan / measured:\n" + "\n".join(rows)


def test_parse_size():
    assert M.parse_size("80GiB") == 80 * 2**30
    assert M.parse_size("80 GB") == 80 * 10**9
    assert M.parse_size("512MiB") == 512 * 2**20 and M.parse_size("1.5mb") == 1_500_000
    assert M.parse_size("1024") == 1024
    for bad in ("80 gigs", "", "GiB", "-1GB", "0", "12..5GB"):
        with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
            M.parse_size(bad)


def test_largest_micro_batch_is_the_last_that_fits():
    cfg = rgb(64, 768, blocks=2, layers=8)
    for settings in (dict(precision="bf16"), dict(precision="fp32", checkpointing="blocks", ema=True, world=8)):
        budget = M.training_memory(cfg, 37, **settings).peak
        assert M.largest_micro_batch(budget, cfg, **settings) == 37
        assert M.largest_micro_batch(budget - 1, cfg, **settings) == 36
    assert M.largest_micro_batch(M.training_memory(cfg, 1).peak - 1, cfg) == 0


def test_accumulation_arithmetic():
    assert M.accumulation(256, 1, 21) == (16, 16)  # equal micro-batches: the largest divisor of 256 <= 21
    assert M.accumulation(256, 1, 256) == (1, 256) and M.accumulation(256, 1, 1000) == (1, 256)
    assert M.accumulation(256, 8, 40) == (1, 32) and M.accumulation(256, 8, 5) == (8, 4)
    assert M.accumulation(768, 1, 25) == (32, 24) and M.accumulation(97, 1, 50) == (97, 1)
    for bad in ((256, 3, 8), (256, 1, 0), (0, 1, 8)):
        with pytest.raises(ValueError):
            M.accumulation(*bad)


def test_chunk_size():
    assert M.chunk_size(1000, 30, 100) == 30 and M.chunk_size(100, 30, 100) == 0 and M.chunk_size(50, 30, 100) == 0
    with pytest.raises(ValueError):
        M.chunk_size(1000, 0)


def test_training_memory_parts():
    cfg = rgb(32, 256)
    P, base = cfg.num_parameters(), M.training_memory(cfg, 8, "fp32", device="cpu")
    assert (base.params, base.grads, base.optimizer, base.ema) == (4 * P, 4 * P, 8 * P, 0)
    assert M.training_memory(cfg, 8, "fp32", ema=True, device="cpu").peak == base.peak + 4 * P
    assert M.training_memory(cfg, 8, "fp32", world=2, device="cpu").peak == base.peak + 4 * P  # DDP buckets
    assert M.training_memory(cfg, 8, "bf16", device="cpu").activations < base.activations
    assert M.training_memory(cfg, 8, "fp32", accumulating=True, device="cpu").peak > base.peak
    act = {mode: M.training_memory(cfg, 8, "fp32", mode).activations for mode in M.CHECKPOINTING}
    assert act["blocks"] < act["off"] and act["layers"] < act["off"]
    assert M.training_memory(cfg, 8, "fp32").peak > base.peak  # CUDA context and fragmentation
    with pytest.raises(ValueError, match="checkpointing"):
        M.training_memory(cfg, 8, "fp32", "sometimes")


def test_inference_plans():
    cfg = rgb(64, 768, blocks=4, layers=8, num_classes=1000)
    plain, guided = M.sampling_memory(cfg, 16), M.sampling_memory(cfg, 16, guidance=True)
    assert guided.rows == 32 and guided.activations == 2 * plain.activations
    assert M.sampling_memory(cfg, 16, sampler="jacobi").activations > plain.activations
    assert M.classification_memory(cfg, 2).rows == 2000 and M.classification_memory(cfg, 8).rows == 4096
    assert M.denoising_memory(cfg, 4).activations > M.scoring_memory(cfg, 4).activations
    assert M.fid_memory(64).peak - M.fid_memory(32).peak == M.fid_memory(32).peak - M.fid_memory(0).peak
    json.dumps([p.to_dict() for p in (plain, guided, M.fid_memory(8))])


@pytest.mark.parametrize("name", sorted(PAPER))
def test_every_paper_preset_has_a_plan_that_fits_an_80_gib_gpu(name):
    train = PRESETS[name]
    for world in (1, 8):
        plan = M.plan_run(train, 80 * M.GiB, num_classes=PAPER[name], world=world, micro_batch="auto")
        assert plan.fits and plan.micro_batch >= 1, M.describe(plan)
        assert plan.micro_batch * plan.accumulation * world == train.batch_size
        assert plan.memory.peak <= 80 * M.GiB and plan.time_per_step_s > 0
        json.dumps(plan.to_dict())
    # at 1024 tokens a 256 batch does not fit one GPU at once: accumulation, more with checkpointing off
    if name != "cifar10":
        assert plan.largest_by_checkpointing["off"] < train.batch_size
        assert plan.largest_by_checkpointing["blocks"] > 4 * plan.largest_by_checkpointing["off"]


def test_imagenet64_plan_on_one_gpu():
    train = PRESETS["imagenet64"]
    plan = M.plan_run(train, 80 * M.GiB, micro_batch="auto")
    cfg = train.model_config(3, 64, 0)
    assert (plan.precision, plan.parameters, plan.model) == ("fp32", cfg.num_parameters(), "2-768-8-8")
    assert plan.flops_per_image == cfg.flops_per_image() and plan.tflops == M.DEFAULT_TFLOPS["fp32"]
    expected = 3 * cfg.flops_per_image() * 256 / (M.DEFAULT_TFLOPS["fp32"] * 1e12)
    assert plan.time_per_step_s == pytest.approx(expected)
    assert plan.accumulation > 1 and plan.micro_batch * plan.accumulation == 256
    assert (plan.micro_batch, plan.accumulation) == (plan.auto_micro_batch, plan.auto_accumulation)
    assert plan.micro_batch <= plan.largest_micro_batch < 2 * plan.micro_batch
    text = M.describe(plan)
    assert "(fits)" in text and f"micro-batch {plan.micro_batch} x {plan.accumulation}" in text
    # the trainer's default (no split): the whole batch in one pass does not fit, and the plan says so
    whole = M.plan_run(train, 80 * M.GiB)
    assert (whole.micro_batch, whole.accumulation, whole.fits) == (256, 1, False)
    assert "does NOT fit" in M.describe(whole) and whole.auto_micro_batch == plan.micro_batch
    blocks = M.plan_run(train, 80 * M.GiB, micro_batch=64, checkpointing="blocks")
    assert (blocks.micro_batch, blocks.accumulation, blocks.fits) == (64, 4, True)
    assert blocks.time_per_step_s == pytest.approx(4 / 3 * expected)


def test_plan_needs_an_image_size():
    with pytest.raises(ValueError, match="--image-size"):
        M.plan_run(PRESETS["tiny"], 80 * M.GiB)
    assert M.plan_run(PRESETS["tiny"], 80 * M.GiB, in_channels=1, num_classes=10, img_size=8).fits
