"""The cost floor of sampling one batch token by token, from rates measured on this device.

    floor = forward FLOPs of the batch / peak matmul rate  +  key/value bytes read / bandwidth

FLOPs: `ModelConfig.flops_per_image` (matmuls only, 2 per multiply-add, one forward pass over all
T tokens with a causal attention half) times the rows (the batch, doubled with guidance: the
conditional and unconditional passes). Key/value bytes: every sampling step t (1..T-1) reads
the keys and values of the t positions before it, in every layer of every block:
sum over blocks, layers, t of 2 * rows * t * width * bytes per element.

Also reported, separately and not part of the floor: reading every weight once per token
(T * the bytes of the per-token weights: all parameters but the position and class
embeddings), which dominates at small batches where the weights do not stay in cache.

Peak matmul rate: median time of an n x n matmul in the compute dtype, n doubled from 256 until
one takes 50 ms (at most 2048 on CPU, 8192 on CUDA). Bandwidth: on CPU a
`.sum()` over a >= 256 MiB float32 tensor (bytes read / time); on CUDA a copy of 1 GiB
(bytes read + written / time).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from tarflow_core.config import ModelConfig

MAX_MATMUL = {True: 8192, False: 2048}  # largest n for the peak-rate matmul, on CUDA / elsewhere


@dataclass
class DeviceRates:
    peak_flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    matmul_n: int
    bandwidth_bytes: int
    dtype: str

    def describe(self) -> str:
        return (
            f"peak matmul {self.peak_flops / 1e9:.1f} GFLOP/s ({self.matmul_n}x{self.matmul_n}, {self.dtype}), "
            f"memory bandwidth {self.bandwidth / 1e9:.1f} GB/s ({self.bandwidth_bytes / 2**20:.0f} MiB)"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_rates(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> DeviceRates:
    """Peak matmul FLOP/s in `dtype` and memory bandwidth of `device`, measured now."""
    cuda = device.type == "cuda"
    n, seconds = 256, 0.0
    while True:  # grow the matmul until one takes >= 50 ms or reaches the largest size
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = _median_seconds(lambda: a @ b, device, 1)
        if seconds >= 0.05 or n >= MAX_MATMUL[cuda]:
            break
        n *= 2
    peak = 2 * n**3 / _median_seconds(lambda: a @ b, device, repeats)
    del a, b
    nbytes = 2**30 if cuda else 2**28
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    if cuda:
        dst = torch.empty_like(src)
        bandwidth = 2 * nbytes / _median_seconds(lambda: dst.copy_(src), device, repeats)
        del dst
    else:
        bandwidth = nbytes / _median_seconds(src.sum, device, repeats)
    del src
    return DeviceRates(peak, bandwidth, n, nbytes, str(dtype).removeprefix("torch."))


def sampling_floor(cfg: ModelConfig, rows: int, dtype: torch.dtype, rates: DeviceRates) -> dict:
    """Seconds of the floor for sampling `rows` sequences (batch x 2 with guidance) in `dtype`."""
    T, W, N = cfg.num_patches, cfg.width, cfg.num_blocks
    layers = sum(cfg.layers(i) for i in range(N))  # in all blocks (deep-shallow ones differ)
    item = dtype.itemsize
    flops = cfg.flops_per_image() * rows
    kv_bytes = layers * 2 * rows * W * item * (T * (T - 1) // 2)  # sum over t = 1..T-1 of t
    per_token_params = cfg.num_parameters() - N * (T + cfg.num_classes) * W  # no position/class tables
    weight_bytes = T * per_token_params * item
    compute_s, kv_s = flops / rates.peak_flops, kv_bytes / rates.bandwidth
    return {
        "rows": rows,
        "flops": flops,
        "kv_bytes": kv_bytes,
        "compute_s": compute_s,
        "kv_read_s": kv_s,
        "floor_s": compute_s + kv_s,
        "weight_bytes": weight_bytes,
        "weights_once_per_token_s": weight_bytes / rates.bandwidth,
    }
