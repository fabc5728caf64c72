#!/usr/bin/env python
"""Held-out bpd of our trainer against the published TarFlow code trained with the same preset.

In one process: `tarflow_core.train.train` runs the preset (default `tiny`, the embedded digits)
for --steps steps; the published `transformer_flow.Model`, imported from --ref, is trained
with the published recipe (AdamW 0.9/0.95, weight decay, their warm-up-from-min-lr + cosine
schedule, Gaussian noise x + std * randn, label drop to -1, `Model.get_loss`, VP prior update)
and the same settings: architecture, batch, lr, warm-up, noise, label drop, steps, initial
weights (same torch seed), on the same train split (shuffled from a seeded torch generator),
on CPU in fp32. The two runs are interleaved, a segment of reference steps after each of our
log intervals, so a busy machine slows both alike.

Both are evaluated at the same steps with our trainer's protocol: bits/dim of the test split
(the first `eval_images`) with uniform dequantization drawn from the trainer's fixed eval seed,
in the trainer's batches, so both see identical inputs. The reference's bpd comes from its own
forward (z, per-dim log-dets summed over blocks, prior N(0, var)); at the end its weights are
also loaded into our `TarFlow` and scored by `tarflow_core.likelihood`, and our final checkpoint
is re-scored here, as checks that the protocol really is the same.

    python benchmarks/compare_training.py --ref ref [--steps 1500] [--eval-every 250] [--seed 0] [--threads 1]

Exit status 0 whether or not ours wins (the verdict is printed); 1 when the protocol checks fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from reference_code import import_reference  # noqa: E402  (benchmarks/ is the script's folder)

from tarflow_core import flow
from tarflow_core.checkpoint import load_checkpoint
from tarflow_core.config import ModelConfig
from tarflow_core.data import open_dataset
from tarflow_core.likelihood import nll as our_nll
from tarflow_core.model import TarFlow
from tarflow_core.presets import preset
from tarflow_core.train import EVAL_SEED, train

CHECK_TOL = 1e-4  # bpd: re-scoring must reproduce the logged figures


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", required=True, type=Path, help="folder holding the published transformer_flow.py")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's max steps)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--ref-head-dim",
        type=int,
        default=None,
        help="attention head size of the reference (default: the preset's; the published Model "
        "always uses 64, so it is passed to its MetaBlock)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args()


def import_reference_with_schedule(folder: Path):
    transformer_flow = import_reference(folder)
    try:  # their schedule, when utils.py (torchvision, torchmetrics) is importable
        from utils import CosineLRSchedule
    except ImportError:
        CosineLRSchedule = WarmupCosine
    return transformer_flow, CosineLRSchedule


class WarmupCosine:
    """The published `utils.CosineLRSchedule`, restated: the optimizer starts at min_lr; `step()`,
    called after each optimizer step, counts it and sets the lr for the next one: linear from
    min_lr to max_lr over the warm-up count, then cosine down to min_lr at total_steps."""

    def __init__(self, optimizer, warmup_steps: int, total_steps: int, min_lr: float, max_lr: float):
        self.opt, self.warmup, self.total, self.lo, self.hi, self.count = (
            optimizer,
            warmup_steps,
            total_steps,
            min_lr,
            max_lr,
            0,
        )
        self._set(min_lr)

    def _set(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def step(self) -> float:
        self.count += 1
        if self.count <= self.warmup:
            lr = self.lo + self.count / self.warmup * (self.hi - self.lo)
        else:
            t = (self.count - self.warmup) / (self.total - self.warmup)
            lr = self.lo + 0.5 * (1 + math.cos(math.pi * t)) * (self.hi - self.lo)
        self._set(min(self.hi, max(self.lo, lr)))
        return lr


class ReferenceRun:
    """The published Model trained step by step with the published recipe."""

    def __init__(self, tf, Schedule, cfg, mc, warmup: int, total: int, head_dim: int):
        tf.MetaBlock = functools.partial(tf.MetaBlock, head_dim=head_dim)  # Model does not pass it on
        with torch.random.fork_rng():  # seeded as our trainer seeds its model; its RNG is left alone
            torch.manual_seed(cfg.seed)
            self.model = tf.Model(
                mc.in_channels,
                mc.img_size,
                mc.patch_size,
                mc.width,
                mc.num_blocks,
                mc.layers_per_block,
                nvp=mc.nvp,
                num_classes=mc.num_classes,
            )
            torch.manual_seed(cfg.seed)
            twin = TarFlow(dataclasses.replace(mc, head_dim=head_dim)).state_dict()
        self.same_init = all(torch.equal(v, twin[k]) for k, v in self.model.state_dict().items() if k in twin)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), betas=(cfg.beta1, cfg.beta2), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.schedule = Schedule(self.opt, warmup, total, cfg.min_lr, cfg.lr)
        ds = open_dataset(cfg.data, "train")
        self.x = (
            torch.stack([ds[i][0] for i in range(len(ds))]).float().div(255).sub(0.5).div(0.5)
        )  # ToTensor+Normalize
        self.y = torch.tensor([ds[i][1] for i in range(len(ds))])
        self.cfg, self.mc, self.gen = cfg, mc, torch.Generator().manual_seed(cfg.seed)
        self.batches: list[torch.Tensor] = []
        self.step, self.train_s, self.eval_s = 0, 0.0, 0.0

    @torch.enable_grad()  # also called from inside the trainer's no-grad evaluation
    def advance(self, to_step: int) -> None:
        t0, cfg, m = time.perf_counter(), self.cfg, self.model
        m.train()
        while self.step < to_step:
            if not self.batches:  # a new epoch: shuffled, drop_last
                self.batches = list(torch.randperm(len(self.x), generator=self.gen).split(cfg.batch_size))
                self.batches = [b for b in self.batches if len(b) == cfg.batch_size]
            idx = self.batches.pop(0)
            x = self.x[idx]
            x = x + cfg.noise_std * torch.randn(x.shape, generator=self.gen)
            y = None
            if self.mc.num_classes:
                mask = (torch.rand(len(idx), generator=self.gen) < cfg.label_drop).int()
                y = (1 - mask) * self.y[idx] - mask
            self.opt.zero_grad()
            z, _, logdets = m(x, y)
            loss = m.get_loss(z, logdets)
            if not self.mc.nvp:
                m.update_prior(z.detach().square().mean(dim=0, keepdim=True).sqrt())
            loss.backward()
            self.opt.step()
            self.schedule.step()
            self.step += 1
        self.train_s += time.perf_counter() - t0

    @torch.no_grad()
    def bpd(self, batches) -> float:
        t0, m, total, n = time.perf_counter(), self.model, 0.0, 0
        m.eval()
        for xq, y in batches:
            z, _, logdets = m(xq, y if self.mc.num_classes else None)  # logdets: per dim, summed over blocks
            log_prior = -0.5 * (z.pow(2) / m.var + m.var.log() + flow.LOG_2PI).mean(dim=(1, 2))
            total += flow.nats_to_bpd(-log_prior - logdets).double().sum().item()
            n += len(xq)
        self.eval_s += time.perf_counter() - t0
        return total / n


def eval_batches(cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The trainer's held-out inputs: first eval_images test images, its eval seed and batch size."""
    ds = open_dataset(cfg.data, "test")
    n = len(ds) if cfg.eval_images is None else min(len(ds), cfg.eval_images)
    gen, bs, out = torch.Generator().manual_seed(EVAL_SEED), max(1, min(256, cfg.batch_size * 2)), []
    for s in range(0, n, bs):
        items = [ds[i] for i in range(s, min(n, s + bs))]
        x = torch.stack([it[0] for it in items])
        out.append((flow.dequantize_uniform(x, generator=gen), torch.tensor([it[1] for it in items])))
    return out


@torch.no_grad()
def our_bpd(model: TarFlow, batches) -> float:
    cond = model.config.num_classes > 0
    vals = [flow.nats_to_bpd(our_nll(model.eval(), xq, y if cond else None)).double() for xq, y in batches]
    return torch.cat(vals).mean().item()


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tf, Schedule = import_reference_with_schedule(args.ref)
    base = preset(args.preset)
    with tempfile.TemporaryDirectory(prefix="compare-training-") as tmp:
        cfg = base.replace(
            max_steps=args.steps or base.max_steps,
            eval_every=args.eval_every or base.eval_every,
            seed=args.seed,
            device="cpu",
            precision="fp32",
            sample_every=0,
            checkpoint_every=0,
            run_dir=f"{tmp}/run",
        )
        batches = eval_batches(cfg)
        ours: dict[int, float] = {}
        theirs: dict[int, float] = {}
        rates: list[tuple[int, float]] = []  # (steps in interval, images/s)
        state: dict = {}

        def on_event(e: dict) -> None:
            if e["kind"] == "start":
                state["mc"] = ModelConfig.from_dict(e["model"])
                state["ref"] = ReferenceRun(
                    tf,
                    Schedule,
                    cfg,
                    state["mc"],
                    e["warmup_steps"],
                    e["total_steps"],
                    args.ref_head_dim or cfg.head_dim,
                )
                state["start"] = e
                state["last"] = 0
            elif e["kind"] == "train":
                rates.append((e["step"] - state["last"], e["images_per_s"]))
                state["last"] = e["step"]
                state["ref"].advance(e["step"])
            elif e["kind"] == "eval":
                ours[e["step"]] = e["bpd"]
                state["ref"].advance(e["step"])
                theirs[e["step"]] = state["ref"].bpd(batches)

        t0 = time.perf_counter()
        result = train(cfg, emit=on_event)
        wall = time.perf_counter() - t0
        ref: ReferenceRun = state["ref"]
        if result.status != "finished":
            sys.exit(f"our run ended {result.status}: {result.reason}")
        ours_wall = wall - ref.train_s - ref.eval_s
        ours_train_s = sum(k * cfg.batch_size / r for k, r in rates)
        mine, _ = load_checkpoint(result.checkpoint)
        rescored_ours = our_bpd(mine, batches)
    mc = state["mc"]
    as_ours = TarFlow(dataclasses.replace(mc, head_dim=args.ref_head_dim or cfg.head_dim))
    as_ours.load_state_dict({k: v for k, v in ref.model.state_dict().items() if not k.endswith(".attn_mask")})
    rescored_ref = our_bpd(as_ours, batches)

    steps = sorted(ours)
    final = steps[-1]
    print(
        f"preset {cfg.preset}: {mc.num_blocks} blocks x {mc.layers_per_block} layers, width {mc.width}, "
        f"patch {mc.patch_size}, {'conditional' if mc.num_classes else 'unconditional'}; batch {cfg.batch_size}, "
        f"lr {cfg.lr:g}, warm-up {state['start']['warmup_steps']}, noise {cfg.noise_label}, "
        f"label drop {cfg.label_drop}, {cfg.max_steps} steps, seed {cfg.seed}, {torch.get_num_threads()} threads; "
        f"held-out: {sum(len(b[0]) for b in batches)} test images; "
        f"reference head dim {args.ref_head_dim or cfg.head_dim}, same initial weights: "
        f"{'yes' if ref.same_init else 'NO'}"
    )
    print(f"{'step':>6} | {'ours bpd':>9} | {'reference bpd':>13}")
    for s in steps:
        print(f"{s:>6} | {ours[s]:>9.4f} | {theirs[s]:>13.4f}")
    ratio = ours[final] / theirs[final]
    print(f"final ratio ours/reference: {ratio:.4f} ({ours[final] - theirs[final]:+.4f} bpd)")
    print(
        f"wall (incl. evaluation): ours {ours_wall:.1f} s, reference {ref.train_s + ref.eval_s:.1f} s; "
        f"training images/s: ours {cfg.max_steps * cfg.batch_size / ours_train_s:.0f}, "
        f"reference {cfg.max_steps * cfg.batch_size / ref.train_s:.0f}"
    )
    checks_ok = abs(rescored_ours - ours[final]) < CHECK_TOL and abs(rescored_ref - theirs[final]) < CHECK_TOL
    print(
        f"protocol checks: our checkpoint re-scored {rescored_ours:.4f} (logged {ours[final]:.4f}); reference weights "
        f"in TarFlow {rescored_ref:.4f} (own forward {theirs[final]:.4f}): {'ok' if checks_ok else 'MISMATCH'}"
    )
    verdict = "PASS" if ours[final] < theirs[final] else "FAIL"
    print(f"{verdict}: ours {'below' if verdict == 'PASS' else 'not below'} the reference at step {final}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "preset": cfg.preset,
                    "steps": cfg.max_steps,
                    "seed": cfg.seed,
                    "threads": torch.get_num_threads(),
                    "ours": {str(s): ours[s] for s in steps},
                    "reference": {str(s): theirs[s] for s in steps},
                    "ours_wall_s": ours_wall,
                    "reference_wall_s": ref.train_s + ref.eval_s,
                    "ours_images_per_s": cfg.max_steps * cfg.batch_size / ours_train_s,
                    "reference_images_per_s": cfg.max_steps * cfg.batch_size / ref.train_s,
                    "ratio": ratio,
                    "verdict": verdict,
                    "checks_ok": checks_ok,
                    "same_init": ref.same_init,
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
