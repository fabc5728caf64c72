#!/usr/bin/env python
"""Check tarflow_core against the published TarFlow code, then time both.

One random reference `Model` is built (its zero-initialised `proj_out` weights are randomised
so the flow is not the identity), the same weights are loaded into our `TarFlow`, and:

  * forward z / log-determinants, loss gradients and samples at guidance 0 and 2 must agree
    (the table's "max abs diff" is the forward one for training);
  * training forward+backward and sampling (guidance 0 and 2) are timed in this process,
    medians of --repeats runs after one warm-up, reference and ours alternating.

    python benchmarks/compare_reference.py --ref ref            # ref/transformer_flow.py

See benchmarks/README.md for how to get the reference code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tarflow_core.config import ModelConfig
from tarflow_core.model import TarFlow
from tarflow_core.sampling import sample

from reference_code import import_reference  # noqa: E402  (benchmarks/ is the script's folder)

FORWARD_TOL = 1e-4  # forward z and per-dim log-determinant
SAMPLE_TOL = 1e-3  # images after inverting every block
TARGETS = {"train fwd+bwd": 1.0, "sample guidance 0": 1.2, "sample guidance 2": 1.7}  # min ref/ours


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", required=True, type=Path, help="folder holding the published transformer_flow.py")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--layers", type=int, default=2, help="transformer layers per flow block")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (after one warm-up)")
    p.add_argument("--bf16", action="store_true", help="time under bfloat16 autocast (meant for cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="process: this process's CPU time, steadier on a busy machine (use with --threads 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args()


def build_models(args: argparse.Namespace, ref_module, device: torch.device):
    """A random reference Model with non-zero proj_out, and our TarFlow holding the same weights."""
    ref = ref_module.Model(3, args.image_size, args.patch, args.width, args.blocks, args.layers,
                           nvp=True, num_classes=args.classes)
    with torch.no_grad():
        for block in ref.blocks:
            block.proj_out.weight.normal_(0.0, 0.02)
    cfg = ModelConfig(in_channels=3, img_size=args.image_size, patch_size=args.patch, width=args.width,
                      num_blocks=args.blocks, layers_per_block=args.layers, nvp=True, num_classes=args.classes)
    ours = TarFlow(cfg)
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith(".attn_mask")}
    ours.load_state_dict(state, strict=True)
    return ref.to(device).eval(), ours.to(device).eval(), cfg


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
    for g in (0.0, 2.0):
        with torch.inference_mode():
            img_ref = ref.reverse(noise.clone(), y, guidance=g)
            img_our = sample(ours, noise.clone(), y, guidance=g)
        diffs[f"sample guidance {g:g}"] = max_diff(img_ref, img_our)
    return diffs


def timed(fn, device: torch.device, clock) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def median_times(ref_fn, our_fn, repeats: int, device: torch.device, clock) -> tuple[float, float]:
    """One warm-up each, then `repeats` alternating runs; medians in seconds."""
    ref_fn(), our_fn()
    ref_t, our_t = [], []
    for _ in range(repeats):
        ref_t.append(timed(ref_fn, device, clock))
        our_t.append(timed(our_fn, device, clock))
    return statistics.median(ref_t), statistics.median(our_t)


def format_table(results: list[dict]) -> str:
    """Markdown table of the timed cases."""
    lines = ["| case               | reference s |   ours s | speed-up | max abs diff |  target | result |",
             "|--------------------|-------------|----------|----------|--------------|---------|--------|"]
    for r in results:
        target = f">= {r['target']:.1f}x"
        lines.append(f"| {r['case']:<18} | {r['reference_s']:>11.4f} | {r['ours_s']:>8.4f} | {r['speedup']:>7.2f}x "
                     f"| {r['max_abs_diff']:>12.2e} | {target:>7} | {'pass' if r['pass'] else 'FAIL':<6} |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    torch.manual_seed(args.seed)
    ref_module = import_reference(args.ref)
    ref, ours, cfg = build_models(args, ref_module, device)
    td = cfg.num_patches * cfg.token_dim
    B = args.batch
    x = torch.randn(B, 3, args.image_size, args.image_size, device=device) * 0.5
    y = torch.randint(args.classes, (B,), device=device) if args.classes else None
    noise = torch.randn(B, cfg.num_patches, cfg.token_dim, device=device)

    load_before = os.getloadavg()[0]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {load_before:.2f}, {args.clock} clock")
    print(f"model {cfg.short_name()} ({ours.num_parameters() / 1e6:.2f}M params), batch {B}"
          f"{', bf16 autocast' if args.bf16 else ''}")
    diffs = check_agreement(ref, ours, cfg, x, y, noise)
    tolerances = {"forward z": FORWARD_TOL, "forward logdet/dim": FORWARD_TOL,
                  "loss gradients": FORWARD_TOL, "sample guidance 0": SAMPLE_TOL, "sample guidance 2": SAMPLE_TOL}
    agree = True
    for name, d in diffs.items():
        ok = d < tolerances[name]
        agree &= ok
        print(f"  agreement {name:<20} max abs diff {d:.2e} (< {tolerances[name]:.0e}) {'ok' if ok else 'MISMATCH'}")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def train_step(model, loss_fn):
        def step():
            model.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn()
            loss.backward()
        return step

    def sample_step(g: float, ours_side: bool):
        def step():
            with torch.inference_mode(), autocast:
                if ours_side:
                    return sample(ours, noise, y, guidance=g)
                return ref.reverse(noise, y, guidance=g)
        return step

    cases = {
        "train fwd+bwd": (train_step(ref, lambda: ref_loss(ref, x, y)),
                          train_step(ours, lambda: our_loss(ours, x, y, td)),
                          max(diffs["forward z"], diffs["forward logdet/dim"])),
        "sample guidance 0": (sample_step(0.0, False), sample_step(0.0, True), diffs["sample guidance 0"]),
        "sample guidance 2": (sample_step(2.0, False), sample_step(2.0, True), diffs["sample guidance 2"]),
    }
    results = []
    for name, (ref_fn, our_fn, diff) in cases.items():
        t_ref, t_our = median_times(ref_fn, our_fn, args.repeats, device, clock)
        results.append({"case": name, "reference_s": t_ref, "ours_s": t_our, "speedup": t_ref / t_our,
                        "max_abs_diff": diff, "target": TARGETS[name], "pass": t_ref / t_our >= TARGETS[name]})
    print(format_table(results))
    load_after = os.getloadavg()[0]
    print(f"load average after timing: {load_after:.2f}")
    if max(load_before, load_after) > 0.5 * (os.cpu_count() or 1):
        print("warning: other processes were busy on this machine; timings may be unreliable")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                   "clock": args.clock, "load_average": [load_before, load_after], "bf16": args.bf16,
                   "batch": B, "repeats": args.repeats, "config": cfg.to_dict(),
                   "agreement": diffs, "agree": agree, "results": results}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if not agree:
        print("the two implementations disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
