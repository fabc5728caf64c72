"""The memory plan (tarflow_core/memory.py) against measured peaks, and its numbers for the paper presets.

    python benchmarks/memory.py [--skip-measure] [--device cpu|cuda] [--json out.json]

1. Measured peak (a fresh process per figure: tarflow_core/memory_calibration.py) vs the plan's figure
   without CUDA context or fragmentation headroom, for one training step and one denoising pass at
   growing width and tokens, then bf16 autocast, checkpointing and EMA at one size. On the CPU two
   measurements run at a time, one thread each; `--device cuda` measures the allocator's peak instead
   (`torch.cuda.max_memory_allocated`: the check of the CUDA case this table could not make).
2. The plan for each paper preset on 80 GiB (H100) and 141 GB (H200) devices: the largest micro-batch by
   checkpointing setting, and the micro-batch x accumulation steps for the preset's global batch on 1
   and 8 GPUs, with the peak and the time per step at the default TFLOP/s of the precision.
3. The inference paths of each preset on an 80 GiB device: the most rows one call can take.

Not a test (tests/core/test_memory.py checks the 25% agreement at three sizes); prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tarflow_core import memory as M  # noqa: E402
from tarflow_core.config import ModelConfig  # noqa: E402
from tarflow_core.memory_calibration import measure_peak  # noqa: E402
from tarflow_core.presets import PRESETS  # noqa: E402

PAPER = {"cifar10": 10, "imagenet64": 0, "imagenet64-cond": 1000, "imagenet128-cond": 1000, "afhq256": 3}
DEVICES = {"80 GiB": 80 * M.GiB, "141 GB": 141 * M.GB}


def rgb(img: int, width: int, blocks: int = 2, layers: int = 2, classes: int = 0) -> ModelConfig:
    return ModelConfig(in_channels=3, img_size=img, patch_size=2, width=width, num_blocks=blocks,
                       layers_per_block=layers, head_dim=64, num_classes=classes)  # fmt: skip


# (config, batch, what, precision, checkpointing, ema): width grows at 256 tokens, tokens grow at width 256
CASES = [(rgb(32, w), b, what, "fp32", "off", False) for w, b in ((128, 32), (256, 16), (384, 12), (512, 8))
         for what in ("training", "denoising")]  # fmt: skip
CASES += [
    (rgb(s, 256), b, what, "fp32", "off", False) for s, b in ((16, 64), (64, 4)) for what in ("training", "denoising")
]
CASES += [(rgb(32, 384, layers=3, classes=10), 12, "training", p, c, e)
          for p, c, e in (("bf16", "off", False), ("fp32", "blocks", False), ("fp32", "layers", False),
                          ("bf16", "layers", False), ("fp32", "off", True))]  # fmt: skip


def planned(cfg, batch, what, precision, ckpt, ema) -> int:
    """The plan's figure without the CUDA context and fragmentation (device "cpu"), which the allocator's
    own peak (CUDA) and the CPU measurement both leave out."""
    if what == "training":
        return M.training_memory(cfg, batch, precision, ckpt, ema, device="cpu").peak
    return M.denoising_memory(cfg, batch, precision=precision, device="cpu").peak


def measured_table(device: str = "cpu") -> list[dict]:
    start = time.perf_counter()
    with ThreadPoolExecutor(2 if device == "cpu" else 1) as pool:
        peaks = list(pool.map(lambda c: measure_peak(c[2], c[0], c[1], c[3], c[4], c[5], device), CASES))
    rows = []
    print(
        "| model | tokens | batch | what | precision | checkpointing | EMA | measured MiB | plan MiB | plan/measured |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (cfg, batch, what, prec, ckpt, ema), peak in zip(CASES, peaks):
        plan = planned(cfg, batch, what, prec, ckpt, ema)
        rows.append(dict(model=cfg.short_name(), tokens=cfg.num_patches, batch=batch, what=what, precision=prec,
                         checkpointing=ckpt, ema=ema, measured=peak, plan=plan))  # fmt: skip
        setting = f"{what} | {prec} | {ckpt} | {'on' if ema else 'off'}"
        print(f"| {cfg.short_name()} | {cfg.num_patches} | {batch} | {setting} "
              f"| {peak / M.MiB:.1f} | {plan / M.MiB:.1f} | {plan / peak:.3f} |")  # fmt: skip
    print(f"\n({len(CASES)} measurements in {time.perf_counter() - start:.0f} s)\n")
    return rows


def preset_table() -> list[dict]:
    rows = []
    print("| preset | model | tokens | precision | params | GFLOP/img | device | largest micro off / blocks / layers "
          "| 1 GPU: micro x acc, peak, s/step | 8 GPUs: micro x acc, peak, s/step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, classes in PAPER.items():
        train = PRESETS[name]
        for label, budget in DEVICES.items():
            one, eight = (M.plan_run(train, budget, num_classes=classes, world=w, micro_batch="auto") for w in (1, 8))
            cfg = train.model_config(3, train.img_size, classes)
            largest = " / ".join(str(one.largest_by_checkpointing[m]) for m in M.CHECKPOINTING)
            cells = [f"{p.micro_batch} x {p.accumulation}, {p.memory.peak / M.GiB:.1f} GiB, {p.time_per_step_s:.2f}"
                     for p in (one, eight)]  # fmt: skip
            print(f"| {name} (batch {train.batch_size}) | {one.model} | {cfg.num_patches} | {one.precision} "
                  f"| {one.parameters / 1e6:.0f}M | {one.flops_per_image / 1e9:.0f} | {label} | {largest} "
                  f"| {cells[0]} | {cells[1]} |")  # fmt: skip
            rows.append(dict(preset=name, device=label, one_gpu=one.to_dict(), eight_gpus=eight.to_dict()))
    print()
    return rows


def most_rows(budget: int, plan) -> int:
    """The most rows within `budget` for a plan linear in its rows (`plan(rows)`), by `chunk_size`."""
    fixed = plan(0).peak
    return M.chunk_size(budget, plan(1).peak - fixed, fixed)


def inference_table(budget: int = 80 * M.GiB) -> list[dict]:
    rows = []
    print("| preset | sampling, guided, bf16 (images) | denoising fp32 | scoring fp32 | classification: images "
          "per call (K classes) | FID images per call |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    fid = most_rows(budget, M.fid_memory)
    for name, classes in PAPER.items():
        train = PRESETS[name]
        cfg = train.model_config(3, train.img_size, classes)
        sampling = most_rows(budget, lambda b: M.sampling_memory(cfg, b, guidance=True, precision="bf16"))
        denoising = most_rows(budget, lambda b: M.denoising_memory(cfg, b))
        scoring = most_rows(budget, lambda b: M.scoring_memory(cfg, b))
        classify = scoring // max(classes, 1) if classes else "-"
        print(f"| {name} | {sampling} | {denoising} | {scoring} | {classify} ({classes}) | {fid} |")
        rows.append(dict(preset=name, sampling=sampling, denoising=denoising, scoring=scoring, fid=fid))
    print()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-measure", action="store_true", help="only the plan's tables (no measurement)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to measure")
    args = parser.parse_args()
    out = {"measured": [] if args.skip_measure else measured_table(args.device)}
    out.update(presets=preset_table(), inference_80GiB=inference_table())
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
