"""Noise -> data: token-by-token inversion with a key/value cache, guidance, and NaN redraws.

Sampler `auto` is sequential off CUDA and calibrated GS-Jacobi on CUDA. Measured on CPUs
(benchmarks/RESULTS.md): one parallel pass over S tokens costs a quarter to a third of S
sequential steps, and trained blocks need many passes (often the whole segment) to converge,
so Jacobi loses there; sequential is also exact and gives run-to-run identical images.
"""

from __future__ import annotations

import numbers
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from .block_runner import BlockRunner
from .cuda_graphs import Replay, graph_pool, use_graphs
from .flow import as_number
from .inversion import InversionStats, bucket_span, invert_segments, invert_sequential, invert_sequential_static
from .likelihood import denoise
from .model import FlowBlock, TarFlow

SAMPLERS = ("auto", "sequential", "jacobi", "gs-jacobi")
GUIDE_WHAT = ("a", "b", "ab")
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_TOL = 1e-4  # Jacobi convergence: largest change between passes, float32 arithmetic
DEFAULT_TOL_HALF = 1e-2  # the same in bfloat16/float16, whose rounding keeps iterates moving ~1e-2
DEFAULT_CHECK_EVERY_CUDA = 4  # Jacobi passes between convergence checks (host syncs) on CUDA


class SamplingError(RuntimeError):
    """Sampling could not produce finite images."""


def check_options(guidance: float, guide_what: str, attn_temp: float, sampler: str) -> None:
    guidance, attn_temp = as_number("guidance", guidance), as_number("attn_temp", attn_temp)
    if not 0 <= guidance < float("inf"):
        raise ValueError(f"guidance must be >= 0 and finite (got {guidance})")
    if guide_what not in GUIDE_WHAT:
        raise ValueError(f"guide_what must be one of {', '.join(GUIDE_WHAT)} (got {guide_what!r})")
    if not 0 < attn_temp < float("inf"):
        raise ValueError(f"attn_temp (attention temperature) must be > 0 and finite (got {attn_temp})")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)} (got {sampler!r})")


def _auto_is_sequential(sampler: str, segments, device: torch.device) -> bool:
    """`auto` without given segments is sequential off CUDA (see the module docstring)."""
    return sampler == "auto" and segments is None and device.type != "cuda"


def default_tol(dtype: torch.dtype) -> float:
    """The Jacobi samplers' default tolerance for this arithmetic (DEFAULT_TOL or DEFAULT_TOL_HALF)."""
    return DEFAULT_TOL_HALF if dtype in (torch.float16, torch.bfloat16) else DEFAULT_TOL


def _compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


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
) -> torch.Tensor:
    """Invert the flow: prior noise (B, T, D) ~ N(0, 1) -> images (B, C, H, W) in [-1, 1] scale.

    The noise is scaled by the prior's standard deviation (sqrt(var)) first, then blocks N-1..0
    are inverted. `sampler`: "sequential" (token by token, exact), "jacobi" (whole-sequence
    fixed-point iteration until the change is below `tol`), "gs-jacobi" (segments of `segments`
    tokens — one length, or one per block in inversion order, 1 meaning sequential — chosen by
    `calibrate_segments` when not given), "auto" (gs-jacobi with calibrated segments, which
    falls back to sequential for blocks where that is fastest). With guidance w > 0 the
    conditional and unconditional passes run as one batch of 2B.

    On CUDA the fixed-shape steps are replayed as CUDA graphs (`cuda_graphs`, default: on for
    CUDA) and the Jacobi samplers read the change every `check_every` passes (default 1 on
    CPUs, DEFAULT_CHECK_EVERY_CUDA on CUDA), so the host waits for the device only then.
    """
    check_options(guidance, guide_what, attn_temp, sampler)
    guidance, attn_temp = float(guidance), float(attn_temp)
    if tol is not None and not as_number("tol", tol) >= 0:
        raise ValueError(f"tol must be >= 0 (got {tol})")
    cfg = model.config
    if not isinstance(noise, torch.Tensor):
        raise TypeError(
            f"noise must be a tensor of shape (N, {cfg.num_patches}, {cfg.token_dim}), got {type(noise).__name__}"
        )
    if noise.dim() != 3 or tuple(noise.shape[1:]) != (cfg.num_patches, cfg.token_dim):
        raise ValueError(f"noise must have shape (N, {cfg.num_patches}, {cfg.token_dim}), got {tuple(noise.shape)}")
    y = model.labels(y, noise.shape[0])
    guide = dict(guidance=guidance, guide_what=guide_what, attn_temp=attn_temp, annealed=annealed)
    device = model.var.device
    graphed = use_graphs(device, cuda_graphs)
    if check_every is None:
        check_every = DEFAULT_CHECK_EVERY_CUDA if device.type == "cuda" else 1
    if isinstance(check_every, bool) or not isinstance(check_every, numbers.Integral) or check_every < 1:
        raise ValueError(f"check_every must be >= 1 (got {check_every})")
    dtype = _compute_dtype(device, model.var.dtype)
    tol = default_tol(dtype) if tol is None else tol
    if stats is not None:
        stats.tol, stats.check_every, stats.cuda_graphs = tol, check_every, graphed
    # the block runner casts explicitly (weights to `dtype`, norms and the flow update in float32),
    # so autocast is switched off inside: nothing is cast behind its back, also under graph capture
    with torch.inference_mode(), torch.autocast(device.type, enabled=False):
        x = noise.to(device, model.var.dtype) * model.var.sqrt()
        if x.shape[0] == 0:
            return model.unpatchify(x).clone()
        per_block = _segments_per_block(model, x, y, sampler, segments, tol, guide, dtype)
        pool = graph_pool(graphed)
        for i, block in enumerate(reversed(model.blocks)):
            x = invert_block(
                block,
                x,
                y,
                segment=per_block[i],
                tol=tol,
                check_every=check_every,
                stats=stats,
                graphed=graphed,
                pool=pool,
                dtype=dtype,
                **guide,
            )
        images = model.unpatchify(x)
    # a plain tensor, not an inference tensor: callers may go on to use the images under autograd
    return images if torch.is_inference_mode_enabled() else images.clone()


def _segments_per_block(model, x, y, sampler, segments, tol, guide, dtype) -> list[int]:
    n, T = len(model.blocks), model.config.num_patches
    if sampler == "sequential":
        return [1] * n
    if sampler == "jacobi":
        return [T - 1] * n
    if _auto_is_sequential(sampler, segments, x.device):
        return [1] * n
    if segments is None:
        return calibrate_segments(model, x, y, tol=tol, dtype=dtype, **guide)
    if isinstance(segments, int):
        segments = [segments] * n
    if len(segments) != n or any(int(s) < 1 for s in segments):
        raise ValueError(f"segments must be a positive length or one per block ({n}), got {segments}")
    return [min(int(s), T - 1) for s in segments]


def invert_block(
    block: FlowBlock,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    segment: int = 1,
    tol: float = DEFAULT_TOL,
    check_every: int = 1,
    stats: InversionStats | None = None,
    graphed: bool = False,
    pool=None,
    dtype: torch.dtype | None = None,
    **guide,
) -> torch.Tensor:
    """Invert one block for natural-order tokens x (B, T, D): sequentially when `segment` is 1,
    else by Jacobi iteration over segments of that many tokens. `graphed`: replay the fixed-shape
    steps as CUDA graphs (sharing the memory `pool`). `dtype`: the transformer's arithmetic
    (default: autocast's when it is on, else x's)."""
    dtype = dtype or _compute_dtype(x.device, x.dtype)
    runner = BlockRunner(block, x.shape[0], y, device=x.device, dtype=dtype, **guide)
    xo = block.order(x).clone()
    if segment <= 1:
        if graphed:
            invert_sequential_static(runner, xo, graphed=True, pool=pool)
        else:
            invert_sequential(runner, xo)
        passes = x.shape[1] - 1
    else:
        passes = invert_segments(
            runner, xo, segment, tol=tol, check_every=check_every, stats=stats, graphed=graphed, pool=pool
        )
    if stats is not None:
        stats.iterations.append(passes)
        stats.segments.append(segment)
    return block.order(xo)


def calibrate_segments(
    model: TarFlow,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    tol: float | None = None,
    probe: int = 4,
    dtype: torch.dtype | None = None,
    **guide,
) -> list[int]:
    """Choose each block's segment length (1 = sequential) from measurement.

    The cost of one pass over a window of S tokens is timed at the real batch size; the number
    of passes each segment length needs is counted on a few samples. Returns the cheapest
    choice per block, in inversion order.
    """
    dtype = dtype or _compute_dtype(x.device, x.dtype)
    tol = default_tol(dtype) if tol is None else tol
    with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
        return _calibrate(model, x, y, tol=tol, probe=probe, dtype=dtype, **guide)


def _calibrate(
    model: TarFlow, x: torch.Tensor, y: torch.Tensor | None, *, tol: float, probe: int, dtype, **guide
) -> list[int]:
    B, T, D = x.shape
    blocks = list(reversed(model.blocks))
    candidates = sorted(
        {s for s in (T - 1, (T - 1 + 1) // 2, (T - 1 + 3) // 4, (T - 1 + 7) // 8) if s >= 2}, reverse=True
    )
    cost = {s: _time_pass(blocks[0], x, y, s, dtype, guide) for s in [1, *candidates]}
    # a segment needs at least two passes to see convergence: drop lengths that cannot beat sequential
    candidates = [s for s in candidates if 2 * -(-(T - 1) // s) * cost[s] < (T - 1) * cost[1]]
    if not candidates:
        return [1] * len(blocks)
    xp = x[:probe].clone()
    yp = y[:probe] if y is not None else None
    chosen = []
    for block in blocks:
        best_s, best_cost, best_out = 1, (T - 1) * cost[1], None
        for s in candidates:
            runner = BlockRunner(block, len(xp), yp, device=x.device, dtype=dtype, **guide)
            xo = block.order(xp).clone()
            passes = invert_segments(runner, xo, s, tol=tol, max_passes=int(best_cost / cost[s]))
            if passes is not None and passes * cost[s] < best_cost:
                best_s, best_cost, best_out = s, passes * cost[s], block.order(xo)
        if best_out is None:
            best_out = invert_block(block, xp, yp, segment=1, dtype=dtype, **guide)
        chosen.append(best_s)
        xp = best_out
    return chosen


def _time_pass(block: FlowBlock, x: torch.Tensor, y, length: int, dtype, guide, repeats: int = 3) -> float:
    """Seconds for one pass over a window of `length` tokens at the real batch size (best of a few),
    run the way sampling runs it: a single token through the fixed-shape step and windows through
    the block forward, each replayed as a CUDA graph on CUDA."""
    runner = BlockRunner(block, x.shape[0], y, device=x.device, dtype=dtype, **guide)
    xo = block.order(x)
    T = xo.shape[1]
    graphed = use_graphs(x.device, None)
    if length == 1:
        pos = torch.full((1,), T // 2, dtype=torch.long, device=x.device)
        work = Replay(lambda: runner.step(xo[:, T // 2], pos, bucket_span(T // 2, T)), graphed=graphed)
    else:
        work = Replay(lambda: runner.params(xo[:, :length], 0), graphed=graphed)
    work(), work()  # warm-up and, on CUDA, capture
    best = float("inf")
    for _ in range(repeats):
        _sync(x.device)
        t0 = time.perf_counter()
        work()
        _sync(x.device)
        best = min(best, time.perf_counter() - t0)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    max_redraws: int = 10,
    on_batch: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
    **options,
) -> SampleResult:
    """Draw `num` images in batches: noise (given or from `generator`), labels (given, or uniform
    random classes for conditional models), sample, optional denoising step, and redraw of any
    sample that came out non-finite (with fresh noise; counted in `redrawn`).

    `precision`: fp32, bf16 (the transformer in bfloat16, norms, exp and the flow update in
    float32, as the published code samples) or auto (bf16 on CUDA, fp32 elsewhere)."""
    cfg = model.config
    device = model.var.device
    if isinstance(num, bool) or not isinstance(num, numbers.Integral) or num < 0:
        raise ValueError(f"num must be a whole number >= 0 (got {num!r})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1 (got {batch_size!r})")
    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(
                f"noise must be a tensor (N, {cfg.num_patches}, {cfg.token_dim}), got {type(noise).__name__}"
            )
        if noise.dim() != 3 or tuple(noise.shape) != (num, cfg.num_patches, cfg.token_dim):
            raise ValueError(
                f"noise must have shape ({num}, {cfg.num_patches}, {cfg.token_dim}) for num={num}, "
                f"got {tuple(noise.shape)}"
            )
    if labels is not None and cfg.conditional:
        labels = model.labels(labels, num).cpu()  # one per image (or one int for all), range checked
    precision = resolve_precision(precision, device)
    if precision == "bf16" and model.var.dtype != torch.float32:
        raise ValueError(f"bf16 sampling runs a float32 model under autocast; this model is {model.var.dtype}")
    half = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    if noise is None:
        noise = draw_noise(model, num, generator)
    if labels is None and cfg.conditional:
        labels = torch.randint(cfg.num_classes, (num,), generator=generator)
    out = torch.empty(num, cfg.in_channels, cfg.img_size, cfg.img_size)
    redrawn = 0
    options = dict(options)
    sampler = options.setdefault("sampler", "sequential")
    if _auto_is_sequential(sampler, options.get("segments"), device):
        options["segments"] = 1
    if sampler in ("auto", "gs-jacobi") and options.get("segments") is None and num > 0:
        # measure once, on the first batch's noise, and use the choice for every batch
        guide = {k: options[k] for k in ("guidance", "guide_what", "attn_temp", "annealed") if k in options}
        first = min(num, batch_size)
        with torch.inference_mode(), half:
            x0 = noise[:first].to(device, model.var.dtype) * model.var.sqrt()
            y0 = labels[:first].to(device) if labels is not None else None
            options["segments"] = calibrate_segments(model, x0, y0, tol=options.get("tol"), **guide)
    stats = InversionStats()
    options["stats"] = stats
    for start in range(0, int(num), int(batch_size)):
        stop = min(num, start + batch_size)
        z = noise[start:stop].clone()
        yb = labels[start:stop].to(device) if labels is not None else None
        todo = torch.arange(stop - start)
        for attempt in range(max_redraws + 1):
            sub_y = yb[todo.to(device)] if yb is not None else None
            with half:
                x = sample(model, z[todo].to(device), sub_y, **options)
            if denoise_sigma:
                x = denoise(model, x, sub_y, sigma=denoise_sigma, lr_scale=denoise_lr_scale)
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
    settings = _settings(options, stats, len(model.blocks), cfg.num_patches)
    return SampleResult(out, labels, redrawn, {**settings, "precision": precision})


def _settings(options: dict, stats: InversionStats, blocks: int, tokens: int) -> dict:
    """What the sampler did, for metadata: method, segment length and mean passes per block."""
    requested = options["sampler"]
    segments = {"sequential": 1, "jacobi": tokens - 1}.get(requested, options.get("segments"))
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
