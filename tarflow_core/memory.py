"""The memory plan: peak bytes per process for training and for each inference path, before a run starts.

Activations are counted from what autograd saves in a `Layer` (model.py), per image and token:

* the two residual-stream tensors the layer norms read (float32 even under bf16 autocast: pos_embed is a
  float32 parameter, so `proj_in(x) + pos_embed` promotes), with each norm's mean and 1/std (16 bytes);
* in the compute dtype s (4 bytes fp32, 2 under bf16 autocast): both norms' outputs as the products take
  them (W each), q, k, v (3W, views of the qkv product), the attention output (W) and its logsumexp
  (one float32 per head; flash / memory-efficient attention, no T x T matrix), the MLP's fc1 output (the
  GELU input, E = expansion * W) and the GELU output (E).

That is 8W + s(6W + 2E) + 4H + 16 bytes per token: 64W in fp32 and 36W under bf16 at expansion 4
(`saved_tensor_bytes` in tests/core/test_memory.py checks the count against autograd's saved tensors). Per
block add proj_out's input and the affine transform's (x - b), exp(-a) and the like (sW + 16D bytes per
token). The peak then follows the step's order (step.py): the last step's gradients live until
`zero_grad(set_to_none=True)`, after the forward, so the forward's end holds every activation and every
gradient; backward then frees activations as it fills gradients, its temporaries the largest early on.
The peak is the weights, AdamW's two moments and the EMA copy (float32 whatever the precision), plus all
activations, plus the larger of the gradients and one layer's backward temporaries. Under bf16 autocast the
graph also holds bf16 copies of the weights until backward. Gradient accumulation (micro-batches) keeps the
gradients resident through the later micro-batches; DDP keeps its own gradient buckets (another 4P).

The figures are calibrated on the CPU (`memory_calibration.measure_peak`, a fresh process per figure).
On CUDA the same tensors are saved; the plan adds the CUDA context and library workspaces, which live
outside PyTorch's allocator, and headroom for the caching allocator's fragmentation (`DEVICE_OVERHEAD`:
estimates, not measured here).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .config import ModelConfig

KiB, MiB, GiB = 2**10, 2**20, 2**30
KB, MB, GB = 10**3, 10**6, 10**9
PRECISIONS = ("fp32", "bf16")
CHECKPOINTING = ("off", "blocks", "layers")
# (bytes outside the allocator, fraction of the dynamic memory lost to fragmentation) per device type.
# CUDA: the context with PyTorch's kernels (~0.5 GiB on an H100) plus cuBLAS/cuDNN workspaces; the caching
# allocator typically reserves 5-10% more than it hands out under changing sizes.
DEVICE_OVERHEAD = {"cuda": (1 * GiB, 0.10), "cpu": (0, 0.0)}
# Sustained TFLOP/s of one H100 SXM when none is stated: ~40% of its dense bf16 peak (989); float32 runs
# use TF32 on CUDA (the trainer enables it), ~40% of its dense TF32 peak (494).
DEFAULT_TFLOPS = {"bf16": 400.0, "fp32": 200.0}
INCEPTION_PARAMS = 23_885_486  # FIDInceptionV3 parameters and buffers (23,850,960 + 34,526)
FID_BYTES_PER_IMAGE = 12 * MiB  # live feature maps of one 299x299 image (14.2 MiB measured with its input)

_UNITS = {"": 1, "b": 1, "kb": KB, "mb": MB, "gb": GB, "tb": 10**12, "kib": KiB, "mib": MiB, "gib": GiB}
_UNITS["tib"] = 2**40


def parse_size(text: str) -> int:
    """'80GiB', '80 GB', '512MiB', '1.5e9' -> bytes (a bare number is bytes); ValueError naming the text."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"not a memory size: {text!r} (expected e.g. 80GiB, 80GB, 512MiB or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


def _check(precision: str, checkpointing: str = "off") -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {', '.join(CHECKPOINTING)} (got {checkpointing!r})")


# ----------------------------------------------------------------------------- per-image activations


def layer_activation_bytes(cfg: ModelConfig, compute: int, residual: int = 4) -> int:
    """Bytes one Layer saves for backward per image (see the module docstring); `compute`/`residual`:
    bytes per value of the products' dtype and of the residual stream."""
    W, E, T = cfg.width, cfg.expansion * cfg.width, cfg.num_patches
    return T * (2 * residual * W + 16 + compute * (6 * W + 2 * E) + 4 * cfg.num_heads)


def block_extra_bytes(cfg: ModelConfig, compute: int) -> int:
    """Saved per image outside the layers of one block: proj_out's input, the affine transform's tensors."""
    return cfg.num_patches * (compute * cfg.width + 16 * cfg.token_dim)


def backward_temp_bytes(cfg: ModelConfig, compute: int) -> int:
    """One layer's backward temporaries per image: the gradients of the GELU output and input (E each,
    alive together) and of the float32 residual stream (twice)."""
    return cfg.num_patches * (2 * compute * cfg.expansion * cfg.width + 8 * cfg.width)


def block_depths(cfg: ModelConfig) -> list[int]:
    """Layers of each block, in model order (unequal in a deep-shallow model)."""
    return [cfg.layers(i) for i in range(cfg.num_blocks)]


def training_activation_bytes(cfg: ModelConfig, compute: int, checkpointing: str = "off", residual: int = 4) -> int:
    """Bytes saved per image over the whole forward; with checkpointing, what is kept plus the one block
    (or layer) whose activations backward recomputes at a time (the deepest block: the largest)."""
    depths, T = block_depths(cfg), cfg.num_patches
    N, L = len(depths), sum(depths)  # blocks, layers in all
    layer, extra = layer_activation_bytes(cfg, compute, residual), block_extra_bytes(cfg, compute)
    if checkpointing == "off":
        return L * layer + N * extra
    if checkpointing == "blocks":  # each block's input tokens (float32), then one block recomputed
        return N * T * cfg.token_dim * 4 + max(depths) * layer + extra
    # layers: each layer's input (the residual stream), the blocks' own tensors, one layer recomputed
    return L * T * residual * cfg.width + N * extra + layer


# ---------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per process of one training step at `micro_batch` images. `peak` is not the sum of the
    parts: the last step's gradients are freed before backward allocates its temporaries, so only the
    larger of the two counts (both when accumulating, as gradients then stay resident)."""

    micro_batch: int
    precision: str
    checkpointing: str
    params: int
    grads: int
    optimizer: int  # AdamW's exp_avg and exp_avg_sq, float32
    ema: int  # the EMA shadow copy, float32
    activations: int  # saved for backward (kept tensors, plus one recomputed block or layer)
    workspace: int  # backward temporaries, bf16 weight copies, inputs, DDP buckets, runtime, fragmentation
    peak: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def training_memory(
    cfg: ModelConfig,
    micro_batch: int,
    precision: str = "bf16",
    checkpointing: str = "off",
    ema: bool = False,
    *,
    world: int = 1,
    accumulating: bool = False,
    device: str = "cuda",
) -> TrainingMemory:
    """Peak bytes of one process's training step (forward, loss, backward, AdamW, EMA) at `micro_batch`
    images, bf16 autocast or fp32, with activation checkpointing off / per block / per layer."""
    _check(precision, checkpointing)
    runtime, frag = DEVICE_OVERHEAD[device]
    P, s = cfg.num_parameters(), 4 if precision == "fp32" else 2
    params, grads, optimizer, ema_bytes = 4 * P, 4 * P, 8 * P, 4 * P if ema else 0
    activations = micro_batch * training_activation_bytes(cfg, s, checkpointing)
    temps = micro_batch * (backward_temp_bytes(cfg, s) + 3 * 4 * cfg.data_dim)  # + images, noise, noisy input
    casts = 2 * P if precision == "bf16" else 0  # autocast's bf16 weights, held by the graph until backward
    buckets = 4 * P if world > 1 else 0  # DDP's gradient buckets (no gradient_as_bucket_view)
    if checkpointing == "off":  # the old gradients live until zero_grad, after the forward; then temporaries
        dynamic = activations + casts + (grads + temps if accumulating else max(grads, temps))
    else:  # backward fills the gradients while every recomputed segment is as large: count them all; the
        # graph holds only the segment's bf16 weights, the forward's end all of them (autocast's cache):
        # the deepest block's share of them, or one layer's
        depths = block_depths(cfg)
        segment_casts = casts * (max(depths) if checkpointing == "blocks" else 1) // sum(depths)
        dynamic = activations + grads + max(casts, temps + segment_casts)
    extra = int(frag * dynamic) + runtime
    peak = params + optimizer + ema_bytes + buckets + dynamic + extra
    workspace = temps + casts + buckets + extra
    return TrainingMemory(micro_batch, precision, checkpointing, params, grads, optimizer, ema_bytes,
                          activations, workspace, peak)  # fmt: skip


def largest_micro_batch(budget: int, cfg: ModelConfig, limit: int = 1 << 20, **settings) -> int:
    """The largest micro-batch whose `training_memory(...).peak` fits `budget` bytes (0: not even one).
    `settings` are training_memory's; the peak grows with the batch, so a bisection finds it."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if training_memory(cfg, mid, **settings).peak <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def accumulation(global_batch: int, world: int, micro: int) -> tuple[int, int]:
    """(steps, micro-batch) to make `global_batch` on `world` processes with micro-batches of at most
    `micro` images, all of one size as the trainer splits them (train/micro.py): the largest divisor
    of the per-process share that is at most `micro`, and share / that steps."""
    if global_batch < 1 or world < 1 or micro < 1:
        raise ValueError(f"need positive sizes (global batch {global_batch}, world {world}, micro-batch {micro})")
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not a multiple of the {world} processes")
    share = global_batch // world
    size = next(k for k in range(min(share, micro), 0, -1) if share % k == 0)
    return share // size, size


@dataclass(frozen=True)
class TrainingPlan:
    """Whether and how a run fits: the chosen micro-batch with its accumulation steps and memory, the
    largest micro-batch that fits the budget (under each checkpointing setting), what `--micro-batch
    auto` would use, and the time per step at `tflops`."""

    model: str
    parameters: int
    flops_per_image: float  # forward
    global_batch: int
    world: int
    precision: str
    checkpointing: str
    ema: bool
    budget: int
    micro_batch: int  # the chosen one (no split: each process's whole share)
    accumulation: int
    memory: TrainingMemory
    fits: bool
    largest_micro_batch: int
    largest_by_checkpointing: dict
    auto_micro_batch: int  # --micro-batch auto: the largest divisor of the share that fits
    auto_accumulation: int
    tflops: float
    time_per_step_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_training(
    cfg: ModelConfig,
    global_batch: int,
    budget: int,
    *,
    precision: str = "bf16",
    checkpointing: str = "off",
    ema: bool = False,
    world: int = 1,
    micro_batch: int | str | None = "auto",
    tflops: float | None = None,
    device: str = "cuda",
) -> TrainingPlan:
    """The plan for `global_batch` images per step on `world` processes of `budget` bytes each, at
    `micro_batch`: a number, "auto" (the largest that fits) or None (no split, as the trainer's default).
    Time per step: 3 forward FLOPs per image (forward and a backward of twice its cost), 4 with
    checkpointing (the forward again), at `tflops` per process (default `DEFAULT_TFLOPS[precision]`)."""
    settings = dict(precision=precision, ema=ema, world=world, device=device)
    by_mode = {}
    for mode in CHECKPOINTING:  # the accumulating figure: true of every micro-batch but the first
        by_mode[mode] = largest_micro_batch(budget, cfg, checkpointing=mode, accumulating=True, **settings)
    largest = by_mode[checkpointing]
    auto_steps, auto_micro = accumulation(global_batch, world, max(largest, 1))
    chosen = {None: global_batch // world, "auto": auto_micro}.get(micro_batch, micro_batch)  # type: ignore[arg-type]
    steps, micro = accumulation(global_batch, world, int(chosen))
    memory = training_memory(cfg, micro, checkpointing=checkpointing, accumulating=steps > 1, **settings)
    flops = cfg.flops_per_image() * (3 if checkpointing == "off" else 4) * global_batch / world
    tflops = tflops or DEFAULT_TFLOPS[precision]
    return TrainingPlan(cfg.short_name(), cfg.num_parameters(), cfg.flops_per_image(), global_batch, world,
                        precision, checkpointing, ema, budget, micro, steps, memory, memory.peak <= budget, largest,
                        by_mode, auto_micro, auto_steps, tflops, flops / (tflops * 1e12))  # fmt: skip


def plan_run(
    train_cfg, budget: int, *, in_channels: int = 3, num_classes: int = 0, img_size: int | None = None, **options
) -> TrainingPlan:
    """`plan_training` for a `TrainConfig` (e.g. a preset): its architecture for data of `in_channels`,
    `num_classes` and its image size (or `img_size`), its global batch, EMA, precision on CUDA, and its
    checkpointing and micro-batch where it has them; `options` override."""
    size = img_size or train_cfg.img_size
    if size is None:  # read off the data by the trainer; the plan does not open the data
        raise ValueError("the plan needs the image size: the settings leave it to the data (give --image-size)")
    cfg = train_cfg.model_config(in_channels, size, num_classes)
    options.setdefault("precision", train_cfg.resolved_precision(options.get("device", "cuda")))
    options.setdefault("checkpointing", getattr(train_cfg, "checkpointing", "off"))
    options.setdefault("micro_batch", getattr(train_cfg, "micro_batch", None))  # None: no split
    return plan_training(cfg, train_cfg.batch_size, budget, ema=bool(train_cfg.ema_decay), **options)


def describe(plan: TrainingPlan) -> str:
    """The plan as lines of text, as `tarflow train --plan` prints it."""
    m, gib = plan.memory, format_size
    largest = ", ".join(f"{k} {v}" for k, v in plan.largest_by_checkpointing.items())
    return "\n".join([
        f"model {plan.model}: {plan.parameters / 1e6:.1f}M parameters, {plan.flops_per_image / 1e9:.1f} GFLOP "
        f"per image (forward)",
        f"global batch {plan.global_batch} on {plan.world} process(es), {plan.precision}, checkpointing "
        f"{plan.checkpointing}, EMA {'on' if plan.ema else 'off'}, {gib(plan.budget)} per process",
        f"micro-batch {plan.micro_batch} x {plan.accumulation} accumulation step(s): peak {gib(m.peak)} "
        f"per process ({'fits' if plan.fits else 'does NOT fit'})",
        f"  weights {gib(m.params)}, gradients {gib(m.grads)}, AdamW {gib(m.optimizer)}, EMA {gib(m.ema)}, "
        f"activations {gib(m.activations)}, workspace {gib(m.workspace)}",
        f"largest micro-batch that fits, by checkpointing: {largest}",
        f"time per step at {plan.tflops:g} TFLOP/s per process: {plan.time_per_step_s:.2f} s",
    ])  # fmt: skip


# --------------------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class InferencePlan:
    """Bytes of one inference call: the weights, what grows with the rows (activations, caches), the rest."""

    path: str  # sampling, denoising, scoring, classification, fid
    rows: int  # sequences (or images) processed at once
    weights: int
    activations: int
    workspace: int
    peak: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _inference(path: str, rows: int, weights: int, activations: int, workspace: int, device: str) -> InferencePlan:
    runtime, frag = DEVICE_OVERHEAD[device]
    workspace += int(frag * activations) + runtime
    return InferencePlan(path, rows, weights, activations, workspace, weights + activations + workspace)


def _model_bytes(precision: str) -> int:
    _check(precision)
    return 4 if precision == "fp32" else 2


def scoring_bytes_per_image(cfg: ModelConfig, precision: str = "fp32") -> int:
    """Live bytes per image of a no-grad forward, at its largest inside a layer's MLP: the layer's input
    and middle residual, the norm's float32 output, the fc1 and GELU outputs (earlier ones are freed)."""
    s, W = _model_bytes(precision), cfg.width
    return cfg.num_patches * (2 * s * W + 4 * W + 2 * s * cfg.expansion * W + 16 * cfg.token_dim)


def sampling_memory(
    cfg: ModelConfig, batch: int, *, guidance: float = 0.0, precision: str = "fp32", sampler: str = "sequential",
    device: str = "cuda",
) -> InferencePlan:  # fmt: skip
    """Sampling `batch` images (fast/runner.py): the float32 weights, one block's key/value cache (layers x 2
    x rows x T x W, rows = 2B with guidance) and conditioning per position, in the compute dtype; Jacobi
    samplers add a no-grad full-sequence pass. Weights as the runner takes them: on CUDA one block's cast
    (bf16), on the CPU the per-block copies it caches (one more float32 set)."""
    s, T, W, P = _model_bytes(precision), cfg.num_patches, cfg.width, cfg.num_parameters()
    rows = batch * (2 if guidance else 1)  # guidance: the unconditional pass as B more rows
    deepest, layers = max(block_depths(cfg)), sum(block_depths(cfg))
    # one block's cast: the deepest block's share of the layers (the blocks' own tables counted as generously)
    prepared = 4 * P if device == "cpu" else (s * P * deepest // layers if s != 4 else 0)
    cache = deepest * 2 * rows * T * W * s + rows * T * W * s  # keys/values + conditioning
    activations = cache + (rows * scoring_bytes_per_image(cfg, precision) if sampler != "sequential" else 0)
    workspace = 3 * rows * T * cfg.token_dim * 4 + batch * cfg.data_dim * 4  # tokens, noise, images
    return _inference("sampling", rows, 4 * P + prepared, activations, workspace, device)


def denoising_memory(cfg: ModelConfig, batch: int, *, precision: str = "fp32", device: str = "cuda") -> InferencePlan:
    """One autograd pass of log p(x) w.r.t. x: a full forward's saved tensors over every block (as in
    training, as the weights require grad), one layer's backward temporaries, the input and its gradient."""
    s = _model_bytes(precision)
    activations = batch * training_activation_bytes(cfg, s, "off", residual=s)
    workspace = batch * (backward_temp_bytes(cfg, s) + 3 * 4 * cfg.data_dim)
    return _inference("denoising", batch, cfg.num_parameters() * s, activations, workspace, device)


def scoring_memory(cfg: ModelConfig, batch: int, *, precision: str = "fp32", device: str = "cuda") -> InferencePlan:
    """log_prob without grad: the weights and one layer's live tensors at a time."""
    s = _model_bytes(precision)
    activations = batch * scoring_bytes_per_image(cfg, precision)
    return _inference("scoring", batch, cfg.num_parameters() * s, activations, batch * 3 * 4 * cfg.data_dim, device)


def classification_memory(
    cfg: ModelConfig, batch: int, *, chunk: int = 4096, precision: str = "fp32", device: str = "cuda"
) -> InferencePlan:
    """class_log_likelihoods: K x B (image, class) pairs scored `chunk` rows at a time."""
    rows = min(max(cfg.num_classes, 1) * batch, chunk)
    plan = scoring_memory(cfg, rows, precision=precision, device=device)
    return dataclasses.replace(plan, path="classification")


def fid_memory(batch: int, *, device: str = "cuda") -> InferencePlan:
    """Inception-v3 features of `batch` images at 299x299 (float32, no grad)."""
    workspace = 2 * batch * 3 * 299 * 299 * 4  # the resized input and its normalised copy
    return _inference("fid", batch, INCEPTION_PARAMS * 4, batch * FID_BYTES_PER_IMAGE, workspace, device)


def chunk_size(budget: int, per_item_bytes: int, fixed_bytes: int = 0) -> int:
    """The most items per chunk within `budget` bytes when each costs `per_item_bytes` on top of
    `fixed_bytes` (weights, caches); 0 when not even one fits."""
    if per_item_bytes <= 0:
        raise ValueError(f"per-item bytes must be positive (got {per_item_bytes})")
    return max(0, (budget - fixed_bytes) // per_item_bytes)
