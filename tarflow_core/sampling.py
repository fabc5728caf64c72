"""Noise -> data, the public entry: options checked once, a backend of `tarflow_core.fast` chosen, NaN redraws.

Sampler `auto` is sequential off CUDA and calibrated GS-Jacobi on CUDA. Measured on CPUs
(benchmarks/RESULTS.md): one parallel pass over S tokens costs a quarter to a third of S
sequential steps, and trained blocks need many passes (often the whole segment) to converge,
so Jacobi loses there; sequential is also exact and gives run-to-run identical images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from . import inputs
from .fast.calibration import calibrate_segments
from .fast.graphs import graph_pool, use_graphs
from .fast.inversion import DEFAULT_TOL, DEFAULT_TOL_HALF, InversionSettings, InversionStats, default_tol, invert_block
from .fast.runner import compute_dtype
from .inputs import GUIDE_WHAT, SAMPLERS, SamplingOptions
from .likelihood import denoise
from .model import TarFlow

__all__ = [
    "DEFAULT_CHECK_EVERY_CUDA",
    "DEFAULT_TOL",
    "DEFAULT_TOL_HALF",
    "GUIDE_WHAT",
    "PRECISIONS",
    "SAMPLERS",
    "InversionStats",
    "SampleResult",
    "SamplingError",
    "SamplingOptions",
    "calibrate_segments",
    "default_tol",
    "draw_noise",
    "generate",
    "resolve_precision",
    "sample",
]

PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_CHECK_EVERY_CUDA = 4  # Jacobi passes between convergence checks (host syncs) on CUDA


class SamplingError(RuntimeError):
    """Sampling could not produce finite images."""


def _auto_is_sequential(sampler: str, segments, device: torch.device) -> bool:
    """`auto` without given segments is sequential off CUDA (see the module docstring)."""
    return sampler == "auto" and segments is None and device.type != "cuda"


def sample(
    model: TarFlow,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    guidance: float = 0.0,
    guide_what: str = "ab",
    attn_temp: float = 1.0,
    annealed: bool = False,
    sampler: str = "sequential",
    segments: int | list[int] | None = None,
    tol: float | None = None,
    check_every: int | None = None,
    stats: InversionStats | None = None,
    cuda_graphs: bool | None = None,
    options: SamplingOptions | None = None,
) -> torch.Tensor:
    """Invert the flow: prior noise (B, T, D) ~ N(0, 1) -> images (B, C, H, W) in [-1, 1] scale.

    The noise is scaled by the prior's standard deviation (sqrt(var)) first, then blocks N-1..0
    are inverted (`TarFlow.reverse` states the maths; this runs it through `tarflow_core.fast`).
    `sampler`: "sequential" (token by token, exact), "jacobi" (whole-sequence fixed-point
    iteration until the change is below `tol`), "gs-jacobi" (segments of `segments` tokens — one
    length, or one per block in inversion order, 1 meaning sequential — chosen by
    `calibrate_segments` when not given), "auto" (gs-jacobi with calibrated segments, which
    falls back to sequential for blocks where that is fastest). With guidance w > 0 the
    conditional and unconditional passes run as one batch of 2B.

    On CUDA the fixed-shape steps are replayed as CUDA graphs (`cuda_graphs`, default: on for
    CUDA) and the Jacobi samplers read the change every `check_every` passes (default 1 on
    CPUs, DEFAULT_CHECK_EVERY_CUDA on CUDA), so the host waits for the device only then.

    `options`: the keywords above already checked, as one `SamplingOptions` (`generate` builds
    it once for all its batches); when given, those keywords are not read.
    """
    if options is None:
        options = SamplingOptions(
            guidance=guidance,
            guide_what=guide_what,
            attn_temp=attn_temp,
            annealed=annealed,
            sampler=sampler,
            segments=segments,
            tol=tol,
            check_every=check_every,
            cuda_graphs=cuda_graphs,
        )
    noise = inputs.noise(model, noise)
    y = inputs.labels(model, y, noise.shape[0])
    device = model.var.device
    settings = _resolve(options, device, model.var.dtype)
    if stats is not None:
        stats.tol, stats.check_every, stats.cuda_graphs = settings.tol, settings.check_every, settings.graphed
    # the block runner casts explicitly (weights to `dtype`, norms and the flow update in float32),
    # so autocast is switched off inside: nothing is cast behind its back, also under graph capture
    with torch.inference_mode(), torch.autocast(device.type, enabled=False):
        x = noise.to(device, model.var.dtype) * model.var.sqrt()
        if x.shape[0] == 0:
            return model.to_images(x).clone()
        per_block = _segments_per_block(model, x, y, options, settings)
        pool = graph_pool(settings.graphed)
        for i, block in enumerate(reversed(model.blocks)):
            x = invert_block(
                block, x, y, segment=per_block[i], settings=settings, stats=stats, pool=pool, **options.guide
            )
        images = model.to_images(x)
    # a plain tensor, not an inference tensor: callers may go on to use the images under autograd
    return images if torch.is_inference_mode_enabled() else images.clone()


def _resolve(options: SamplingOptions, device: torch.device, model_dtype: torch.dtype) -> InversionSettings:
    """The options that depend on the device and the arithmetic, resolved."""
    graphed = use_graphs(device, options.cuda_graphs)
    check_every = options.check_every
    if check_every is None:
        check_every = DEFAULT_CHECK_EVERY_CUDA if device.type == "cuda" else 1
    dtype = compute_dtype(device, model_dtype)
    tol = default_tol(dtype) if options.tol is None else options.tol
    return InversionSettings(tol=tol, check_every=check_every, graphed=graphed, dtype=dtype)


def _segments_per_block(model: TarFlow, x, y, options: SamplingOptions, settings: InversionSettings) -> list[int]:
    """Each block's segment length in inversion order (1: sequential), calibrated when not given."""
    n, T = len(model.blocks), model.config.num_patches
    sampler, segments = options.sampler, options.segments
    if sampler == "sequential":
        return [1] * n
    if sampler == "jacobi":
        return [T - 1] * n
    if _auto_is_sequential(sampler, segments, x.device):
        return [1] * n
    if segments is None:
        # timed the way sampling runs by default on this device, whatever `cuda_graphs` says
        graphed = use_graphs(x.device, None)
        return calibrate_segments(model, x, y, tol=settings.tol, dtype=settings.dtype, graphed=graphed, **options.guide)
    if isinstance(segments, int):
        segments = [segments] * n
    if len(segments) != n or any(int(s) < 1 for s in segments):
        raise ValueError(f"segments must be a positive length or one per block ({n}), got {segments}")
    return [min(int(s), T - 1) for s in segments]


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) model space, float32, on CPU
    labels: torch.Tensor | None  # (N,) int64 or None
    redrawn: int = 0  # samples that came out non-finite and were drawn again
    settings: dict = field(default_factory=dict)


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 | bf16 | auto -> fp32 or bf16 (auto: bf16 on CUDA only)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def draw_noise(model: TarFlow, num: int, generator: torch.Generator) -> torch.Tensor:
    cfg = model.config
    return torch.randn(num, cfg.num_patches, cfg.token_dim, generator=generator)


def generate(
    model: TarFlow,
    num: int,
    *,
    generator: torch.Generator,
    batch_size: int = 64,
    labels: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    denoise_sigma: float | None = None,
    denoise_lr_scale: float = 1.0,
    max_batch: int | None = None,
    max_redraws: int = 10,
    on_batch: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
    **options,
) -> SampleResult:
    """Draw `num` images in batches: noise (given or from `generator`), labels (given, or uniform
    random classes for conditional models), sample, optional denoising step, and redraw of any
    sample that came out non-finite (with fresh noise; counted in `redrawn`).

    `precision`: fp32, bf16 (the transformer in bfloat16, norms, exp and the flow update in
    float32, as the published code samples) or auto (bf16 on CUDA, fp32 elsewhere). `options`:
    those of `sample` (its `stats` are generate's own). `max_batch`: the most images one pass of the
    denoising step holds (it keeps a whole forward per image for backward; on CUDA the free memory
    bounds it too, see `likelihood.denoise`); the sampling batches stay `batch_size`."""
    cfg = model.config
    device = model.var.device
    inputs.generate_request(model, num, batch_size, noise)
    if labels is not None and cfg.conditional:
        labels = inputs.labels(model, labels, num).cpu()  # one per image (or one int for all), range checked
    precision = resolve_precision(precision, device)
    if precision == "bf16" and model.var.dtype != torch.float32:
        raise ValueError(f"bf16 sampling runs a float32 model under autocast; this model is {model.var.dtype}")
    options.pop("stats", None)
    opts = SamplingOptions(**options)
    half = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    if noise is None:
        noise = draw_noise(model, num, generator)
    if labels is None and cfg.conditional:
        labels = torch.randint(cfg.num_classes, (num,), generator=generator)
    opts = _segments_for_every_batch(model, opts, noise[: min(num, batch_size)], labels, half)
    out = torch.empty(num, cfg.in_channels, cfg.img_size, cfg.img_size)
    redrawn = 0
    stats = InversionStats()
    for start in range(0, int(num), int(batch_size)):
        stop = min(num, start + batch_size)
        z = noise[start:stop].clone()
        yb = labels[start:stop].to(device) if labels is not None else None
        todo = torch.arange(stop - start)
        for attempt in range(max_redraws + 1):
            sub_y = yb[todo.to(device)] if yb is not None else None
            with half:
                x = sample(model, z[todo].to(device), sub_y, options=opts, stats=stats)
            if denoise_sigma:
                x = denoise(model, x, sub_y, sigma=denoise_sigma, lr_scale=denoise_lr_scale, max_batch=max_batch)
            x = x.float().cpu()
            out[start + todo] = x
            bad = ~torch.isfinite(x.flatten(1)).all(dim=1)
            if not bad.any():
                break
            if attempt == max_redraws:
                raise SamplingError(f"{int(bad.sum())} samples were still non-finite after {max_redraws} redraws")
            todo = todo[bad]
            redrawn += len(todo)
            z[todo] = draw_noise(model, len(todo), generator).to(z.dtype)
        if on_batch is not None:
            on_batch(stop, num)
    settings = _settings(opts, stats, len(model.blocks), cfg.num_patches)
    return SampleResult(out, labels, redrawn, {**settings, "precision": precision})


def _segments_for_every_batch(model: TarFlow, opts: SamplingOptions, first_noise, labels, half) -> SamplingOptions:
    """`opts` with the segments every batch uses: `auto` off CUDA is sequential (1), and calibrated
    samplers measure once, on the first batch's noise `first_noise`."""
    device = model.var.device
    if _auto_is_sequential(opts.sampler, opts.segments, device):
        return dataclasses.replace(opts, segments=1)
    if opts.sampler in ("auto", "gs-jacobi") and opts.segments is None and len(first_noise):
        with torch.inference_mode(), half:
            x0 = first_noise.to(device, model.var.dtype) * model.var.sqrt()
            y0 = labels[: len(first_noise)].to(device) if labels is not None else None
            return dataclasses.replace(opts, segments=calibrate_segments(model, x0, y0, tol=opts.tol, **opts.guide))
    return opts


def _settings(options: SamplingOptions, stats: InversionStats, blocks: int, tokens: int) -> dict:
    """What the sampler did, for metadata: method, segment length and mean passes per block."""
    requested = options.sampler
    segments = {"sequential": 1, "jacobi": tokens - 1}.get(requested, options.segments)
    used = requested
    if requested == "auto":  # name the method auto chose
        per_block = segments if isinstance(segments, (list, tuple)) else [segments]
        used = (
            "sequential"
            if all(s is not None and s <= 1 for s in per_block)
            else "jacobi"
            if all(s is not None and s >= tokens - 1 for s in per_block)
            else "gs-jacobi"
        )
    passes = [stats.iterations[i::blocks] for i in range(blocks)] if stats.iterations else []
    mean_passes = [round(sum(p) / len(p), 2) for p in passes if p]
    return {
        "sampler": used,
        "requested": requested,
        "segments": segments,
        "tol": None if used == "sequential" else stats.tol,
        "passes_per_block": mean_passes,
        "sequential_fallbacks": stats.fallbacks,
        "check_every": stats.check_every,
        "cuda_graphs": stats.cuda_graphs,
    }
