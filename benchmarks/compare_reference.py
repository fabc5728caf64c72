#!/usr/bin/env python
"""Check tarflow_core against the published TarFlow code, then time both.

For each weight set (--weights: random, trained for a few hundred steps on the digits, or both)
one reference `Model` and our `TarFlow` hold the same weights, and:

  * forward z / log-determinants, loss gradients and samples at guidance 0 and 2 must agree
    (float32; the exit status is 1 otherwise);
  * a training step (forward+backward; first weight set only) and sampling at guidance 0 and 2
    are timed in this process: medians of --repeats runs after one warm-up, all cases
    alternating; sampling by the reference `Model.reverse` and by ours with every sampler
    (sequential, jacobi, calibrated gs-jacobi, auto = the CLI default);
  * every sampling time is set against the cost floor measured on this device (cost_floor.py).

    python benchmarks/compare_reference.py --ref ref               # ref/transformer_flow.py, CPU
    python benchmarks/compare_reference.py --ref ref --preset gpu  # 3x64x64, 2-768-8-8, batch 64, bf16

See benchmarks/README.md for how to get the reference code and what the targets are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
from cost_floor import measure_rates, sampling_floor  # noqa: E402  (benchmarks/ is the script's folder)
from reference_code import import_reference  # noqa: E402
from trained_weights import trained_model  # noqa: E402

from tarflow_core.config import ModelConfig  # noqa: E402
from tarflow_core.model import TarFlow  # noqa: E402
from tarflow_core.sampling import InversionStats, sample  # noqa: E402

FORWARD_TOL = 1e-4  # forward z and per-dim log-determinant
SAMPLE_TOL = 1e-3  # images after inverting every block
GUIDANCES = (0.0, 2.0)
SAMPLERS = {
    "sequential": "sequential",
    "jacobi": "jacobi",
    "gs-jacobi": "gs-jacobi (calibrated)",
    "auto": "auto (default)",
}
DEFAULT = "auto"
TRAIN_TARGET = 1.0  # min reference / ours for a training step
DEFAULT_SPEEDUP = {"cpu": {0.0: 1.5, 2.0: 2.5}, "cuda": {0.0: 10.0, 2.0: 10.0}}  # min reference / default
DEFAULT_MAX_DIFF = 1e-3  # the default sampler's images vs our sequential ones
NOT_SLOWER = 1.05  # the default may take at most this times the sequential sampler's median (noise)

PRESETS = {
    "cpu": dict(
        device="cpu",
        image_size=32,
        patch=4,
        width=256,
        blocks=4,
        layers=2,
        batch=16,
        bf16=False,
        repeats=5,
        weights="both",
    ),
    "gpu": dict(
        device="cuda",
        image_size=64,
        patch=2,
        width=768,
        blocks=8,
        layers=8,
        batch=64,
        bf16=True,
        repeats=3,
        weights="random",
    ),  # training an 8x8x768 model here is out of scope
}


# ------------------------------------------------------------------------------------ options


def default_cache_dir() -> Path:
    """runs/bench-cache in this checkout when git ignores it, else a folder under the temp dir."""
    candidate = REPO / "runs" / "bench-cache"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if (
            subprocess.run(
                ["git", "check-ignore", "-q", str(candidate)], cwd=REPO, capture_output=True, timeout=10
            ).returncode
            == 0
        ):
            return candidate
    return Path(tempfile.gettempdir()) / "tarflow-bench-cache"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", required=True, type=Path, help="folder holding the published transformer_flow.py")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="cpu: 3x32x32, 4-256-4-2, batch 16 (default); gpu: 3x64x64, 2-768-8-8, batch 64, bf16, "
        "cuda, 3 repeats, random weights only. Explicit options below override it",
    )
    p.add_argument("--device", help="cpu or cuda[:N] (preset)")
    p.add_argument("--batch", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--patch", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--blocks", type=int)
    p.add_argument("--layers", type=int, help="transformer layers per flow block")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, help="timed runs per case after one warm-up (preset: cpu 5, gpu 3)")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time under bfloat16 autocast (preset: gpu only)",
    )
    p.add_argument(
        "--weights",
        choices=("random", "trained", "both"),
        help="random (proj_out randomised), trained on the digits, or both (preset: cpu both, gpu random)",
    )
    p.add_argument("--train-steps", type=int, default=300, help="training steps of the trained weights")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where trained weights are cached (default runs/bench-cache when git-ignored, "
        "else <tmp>/tarflow-bench-cache)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="process: this process's CPU time, steadier on a busy machine (use with --threads 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.train_steps < 1 or args.repeats < 1:
        p.error("--train-steps and --repeats must be >= 1")
    if args.cache_dir is None:
        args.cache_dir = default_cache_dir()
    return args


# ------------------------------------------------------------------------------------- models


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        in_channels=3,
        img_size=args.image_size,
        patch_size=args.patch,
        width=args.width,
        num_blocks=args.blocks,
        layers_per_block=args.layers,
        nvp=True,
        num_classes=args.classes,
    )


def reference_model(ref_module, cfg: ModelConfig):
    return ref_module.Model(
        cfg.in_channels,
        cfg.img_size,
        cfg.patch_size,
        cfg.width,
        cfg.num_blocks,
        cfg.layers_per_block,
        nvp=cfg.nvp,
        num_classes=cfg.num_classes,
    )


def random_pair(ref_module, cfg: ModelConfig, seed: int):
    """A random reference Model with non-zero proj_out, and our TarFlow holding the same weights."""
    torch.manual_seed(seed)
    ref = reference_model(ref_module, cfg)
    with torch.no_grad():
        for block in ref.blocks:
            block.proj_out.weight.normal_(0.0, 0.02)
    ours = TarFlow(cfg)
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.endswith(".attn_mask")}, strict=True)
    return ref, ours


def reference_holding(ref_module, ours: TarFlow):
    """A reference Model holding our model's weights (its own attn_mask buffers are kept)."""
    ref = reference_model(ref_module, ours.config)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or any(not k.endswith(".attn_mask") for k in missing):
        raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    return ref


def build_pair(name: str, args, ref_module, cfg: ModelConfig, device: torch.device, autocast_dtype):
    """(reference, ours, training summary or None) for weight set `name`, in eval mode on `device`."""
    if name == "random":
        ref, ours = random_pair(ref_module, cfg, args.seed)
        training = None
    else:
        ours, training = trained_model(cfg, args.train_steps, args.seed, args.cache_dir, device, autocast_dtype)
        ref = reference_holding(ref_module, ours)
    return ref.to(device).eval(), ours.to(device).eval(), training


# ---------------------------------------------------------------------------------- agreement


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def ref_loss(ref, x, y):
    z, _, logdets = ref(x, y)
    return 0.5 * z.pow(2).mean() - logdets.mean()


def our_loss(ours, x, y, td: int):
    z, logdet = ours(x, y)
    return 0.5 * z.pow(2).mean() - (logdet / td).mean()


def check_agreement(ref, ours, cfg, x, y, noise) -> dict[str, float]:
    """Max abs differences (float32, no autocast) for forward, loss gradients and sampling."""
    td = cfg.num_patches * cfg.token_dim
    with torch.no_grad():
        z_ref, _, ld_ref = ref(x, y)
        z_our, ld_our = ours(x, y)
    diffs = {"forward z": max_diff(z_ref, z_our), "forward logdet/dim": max_diff(ld_ref, ld_our / td)}
    for model, loss in ((ref, lambda: ref_loss(ref, x, y)), (ours, lambda: our_loss(ours, x, y, td))):
        model.zero_grad(set_to_none=True)
        loss().backward()
    grads = dict(ours.named_parameters())
    diffs["loss gradients"] = max(max_diff(p.grad, grads[n].grad) for n, p in ref.named_parameters())
    ref.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    for g in GUIDANCES:
        with torch.inference_mode():
            img_ref = ref.reverse(noise.clone(), y, guidance=g)
            img_our = sample(ours, noise.clone(), y, guidance=g)
        diffs[f"sample guidance {g:g}"] = max_diff(img_ref, img_our)
    return diffs


def report_agreement(diffs: dict[str, float]) -> bool:
    agree = True
    for name, d in diffs.items():
        tol = SAMPLE_TOL if name.startswith("sample") else FORWARD_TOL
        ok = d < tol
        agree &= ok
        print(f"  agreement {name:<20} max abs diff {d:.2e} (< {tol:.0e}) {'ok' if ok else 'MISMATCH'}")
    return agree


# ------------------------------------------------------------------------------------- timing


def timed(fn, device: torch.device, clock) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def median_times(fns: dict, repeats: int, device: torch.device, clock) -> dict[str, float]:
    """One warm-up each, then `repeats` rounds running every case in turn; medians in seconds."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device, clock))
    return {name: statistics.median(t) for name, t in times.items()}


class ReferenceSampler:
    """The reference `Model.reverse`; keeps its last images."""

    def __init__(self, ref, noise, y, guidance: float, autocast):
        self.ref, self.noise, self.y, self.guidance, self.autocast = ref, noise, y, guidance, autocast
        self.out = None

    def __call__(self) -> None:
        with torch.inference_mode(), self.autocast:
            self.out = self.ref.reverse(self.noise.clone(), self.y, guidance=self.guidance)


class OurSampler:
    """`tarflow_core.sampling.sample` with one sampler; keeps its last images and InversionStats.

    The first call (the warm-up) lets gs-jacobi and auto calibrate their segment lengths; later
    calls reuse that choice, as the CLI's `generate` does for every batch after the first.
    """

    def __init__(self, model, noise, y, guidance: float, sampler: str, autocast):
        self.model, self.noise, self.y, self.guidance, self.sampler = model, noise, y, guidance, sampler
        self.autocast = autocast
        self.segments = None
        self.out, self.stats, self.first_s = None, None, None

    def __call__(self) -> None:
        stats = InversionStats()
        start = time.perf_counter()
        with torch.inference_mode(), self.autocast:
            self.out = sample(
                self.model,
                self.noise,
                self.y,
                guidance=self.guidance,
                sampler=self.sampler,
                segments=self.segments,
                stats=stats,
            )
        if self.first_s is None:
            self.first_s = time.perf_counter() - start  # includes the calibration
            if self.sampler in ("gs-jacobi", "auto"):
                self.segments = list(stats.segments)
        self.stats = stats


def time_training(ref, ours, cfg, x, y, args, device, clock, autocast) -> dict:
    td = cfg.num_patches * cfg.token_dim

    def step(model, loss_fn):
        def run():
            model.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn()
            loss.backward()

        return run

    t = median_times(
        {"reference": step(ref, lambda: ref_loss(ref, x, y)), "ours": step(ours, lambda: our_loss(ours, x, y, td))},
        args.repeats,
        device,
        clock,
    )
    ref.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    speedup = t["reference"] / t["ours"]
    return {
        "reference_s": t["reference"],
        "ours_s": t["ours"],
        "speedup": speedup,
        "target": TRAIN_TARGET,
        "pass": speedup >= TRAIN_TARGET,
    }


def time_sampling(ref, ours, cfg, noise, y, g: float, floor: dict, args, device, clock, autocast) -> list[dict]:
    """One row per sampler (reference first) at guidance `g`."""
    fns = {"reference": ReferenceSampler(ref, noise, y, g, autocast)}
    fns.update({name: OurSampler(ours, noise, y, g, name, autocast) for name in SAMPLERS})
    medians = median_times(fns, args.repeats, device, clock)
    sequential = fns["sequential"].out
    rows = []
    for name, fn in fns.items():
        seconds = medians[name]
        if name == "reference":
            passes, segments, fallbacks, first_s = [cfg.num_patches - 1] * cfg.num_blocks, None, 0, None
        else:
            passes, segments, fallbacks = fn.stats.iterations, fn.stats.segments, fn.stats.fallbacks
            first_s = fn.first_s
        rows.append(
            {
                "guidance": g,
                "sampler": SAMPLERS.get(name, "reference"),
                "key": name,
                "seconds": seconds,
                "speedup": medians["reference"] / seconds,
                "max_abs_diff_vs_sequential": max_diff(fn.out, sequential),
                "segments": segments,
                "passes_per_block": passes,
                "mean_passes": statistics.mean(passes),
                "fallbacks": fallbacks,
                "first_run_s": first_s,
                "floor_ratio": seconds / floor["floor_s"],
            }
        )
    return rows


# -------------------------------------------------------------------------------------- targets


def check_targets(rows: list[dict], device: torch.device) -> list[dict]:
    """The default sampler's targets at each guidance: speed-up, agreement, not slower than sequential."""
    speedups = DEFAULT_SPEEDUP["cuda" if device.type == "cuda" else "cpu"]
    targets = []
    for g in GUIDANCES:
        by_key = {r["key"]: r for r in rows if r["guidance"] == g}
        default, sequential = by_key[DEFAULT], by_key["sequential"]
        ratio = default["seconds"] / sequential["seconds"]
        targets += [
            {
                "name": f"g{g:g} default speed-up vs reference",
                "value": f"{default['speedup']:.2f}x",
                "target": f">= {speedups[g]:g}x",
                "pass": default["speedup"] >= speedups[g],
            },
            {
                "name": f"g{g:g} default max abs diff vs sequential",
                "value": f"{default['max_abs_diff_vs_sequential']:.1e}",
                "target": f"<= {DEFAULT_MAX_DIFF:.0e}",
                "pass": default["max_abs_diff_vs_sequential"] <= DEFAULT_MAX_DIFF,
            },
            {
                "name": f"g{g:g} default / sequential seconds",
                "value": f"{ratio:.2f}",
                "target": f"<= {NOT_SLOWER:.2f}",
                "pass": ratio <= NOT_SLOWER,
            },
        ]
    return targets


def floor_ratios(rows: list[dict]) -> dict:
    """seconds / floor for the reference, our sequential and our fastest sampler, per guidance."""
    out = {}
    for g in GUIDANCES:
        at_g = [r for r in rows if r["guidance"] == g]
        fastest = min((r for r in at_g if r["key"] != "reference"), key=lambda r: r["seconds"])
        by_key = {r["key"]: r for r in at_g}
        out[f"{g:g}"] = {
            "reference": by_key["reference"]["floor_ratio"],
            "sequential": by_key["sequential"]["floor_ratio"],
            "fastest": fastest["floor_ratio"],
            "fastest_sampler": fastest["sampler"],
        }
    return out


# ------------------------------------------------------------------------------------- tables


def markdown_table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """The first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return (
            "| "
            + " | ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def per_block(values) -> str:
    return "/".join(str(v) for v in values) if values else "-"


def training_table(t: dict) -> str:
    return markdown_table(
        ["case", "reference s", "ours s", "speed-up", "target", "result"],
        [
            [
                "train fwd+bwd",
                f"{t['reference_s']:.4f}",
                f"{t['ours_s']:.4f}",
                f"{t['speedup']:.2f}x",
                f">= {t['target']:.1f}x",
                verdict(t["pass"]),
            ]
        ],
    )


def floor_table(floors: dict) -> str:
    return markdown_table(
        ["guidance", "rows", "GFLOP", "compute s", "KV MB", "KV read s", "floor s", "weights/token s"],
        [
            [
                f"{g}",
                str(f["rows"]),
                f"{f['flops'] / 1e9:.3g}",
                f"{f['compute_s']:.4f}",
                f"{f['kv_bytes'] / 1e6:.1f}",
                f"{f['kv_read_s']:.4f}",
                f"{f['floor_s']:.4f}",
                f"{f['weights_once_per_token_s']:.4f}",
            ]
            for g, f in floors.items()
        ],
    )


def sampling_table(rows: list[dict]) -> str:
    return markdown_table(
        [
            "g",
            "sampler",
            "segments",
            "median s",
            "vs ref",
            "max abs diff vs seq",
            "passes/block",
            "mean",
            "fallbacks",
            "x floor",
        ],
        [
            [
                f"{r['guidance']:g}",
                r["sampler"],
                per_block(r["segments"]),
                f"{r['seconds']:.4f}",
                f"{r['speedup']:.2f}x",
                f"{r['max_abs_diff_vs_sequential']:.1e}",
                per_block(r["passes_per_block"]),
                f"{r['mean_passes']:.1f}",
                str(r["fallbacks"]),
                f"{r['floor_ratio']:.1f}",
            ]
            for r in rows
        ],
        left=2,
    )


def targets_table(targets: list[dict]) -> str:
    return markdown_table(
        ["target", "value", "needed", "result"],
        [[t["name"], t["value"], t["target"], verdict(t["pass"])] for t in targets],
    )


# --------------------------------------------------------------------------------------- main


def weight_sets(choice: str) -> list[str]:
    return ["random", "trained"] if choice == "both" else [choice]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    ref_module = import_reference(args.ref)
    cfg = model_config(args)
    B = args.batch
    gen = torch.Generator().manual_seed(args.seed)
    x = (torch.randn(B, 3, args.image_size, args.image_size, generator=gen) * 0.5).to(device)
    y = torch.randint(args.classes, (B,), generator=gen).to(device) if args.classes else None
    noise = torch.randn(B, cfg.num_patches, cfg.token_dim, generator=gen).to(device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    load_before = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}, load average {load_before:.2f}, {args.clock} clock"
    )
    print(
        f"preset {args.preset}: model {cfg.img_size}x{cfg.img_size} {cfg.short_name()} "
        f"({cfg.num_parameters() / 1e6:.2f}M params, {cfg.num_patches} tokens), batch {B}, "
        f"{'bf16 autocast' if args.bf16 else 'float32'}, {args.repeats} repeats, weights {args.weights}"
        + (
            " (the gpu preset times random weights unless --weights asks for more)"
            if args.preset == "gpu" and args.weights == "random"
            else ""
        )
    )
    rates = measure_rates(device, dtype)
    floors = {f"{g:g}": sampling_floor(cfg, B * (2 if g > 0 else 1), dtype, rates) for g in GUIDANCES}
    print(f"cost floor: {rates.describe()}")
    print(floor_table(floors))

    summary = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "preset": args.preset,
        "bf16": args.bf16,
        "batch": B,
        "repeats": args.repeats,
        "seed": args.seed,
        "config": cfg.to_dict(),
        "rates": rates.to_dict(),
        "floors": floors,
        "weights": {},
    }
    agree, training_timing = True, None
    for name in weight_sets(args.weights):
        print(f"\n## {name} weights")
        ref, ours, training = build_pair(name, args, ref_module, cfg, device, dtype if args.bf16 else None)
        diffs = check_agreement(ref, ours, cfg, x, y, noise)
        agree &= report_agreement(diffs)
        if training_timing is None:
            training_timing = time_training(ref, ours, cfg, x, y, args, device, clock, autocast)
            print(training_table(training_timing))
        rows = []
        for g in GUIDANCES:
            rows += time_sampling(ref, ours, cfg, noise, y, g, floors[f"{g:g}"], args, device, clock, autocast)
        print(sampling_table(rows))
        ratios = floor_ratios(rows)
        for g, r in ratios.items():
            print(
                f"  x floor at guidance {g}: reference {r['reference']:.1f}, our sequential {r['sequential']:.1f}, "
                f"our fastest ({r['fastest_sampler']}) {r['fastest']:.1f}"
            )
        targets = check_targets(rows, device)
        print(targets_table(targets))
        summary["weights"][name] = {
            "training": training,
            "agreement": diffs,
            "samplers": rows,
            "floor_ratios": ratios,
            "targets": targets,
        }

    load_after = os.getloadavg()[0]
    print(f"\nload average after timing: {load_after:.2f}")
    if max(load_before, load_after) > 0.5 * (os.cpu_count() or 1):
        print("warning: other processes were busy on this machine; timings may be unreliable")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary.update({"load_average": [load_before, load_after], "agree": agree, "training_step": training_timing})
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if not agree:
        print("the two implementations disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
