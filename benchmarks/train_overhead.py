"""Trainer overhead: images/s of `tarflow_core.train.train` vs a bare forward+backward+AdamW loop.

Same model (the `tiny` preset unless overridden), same batch size, same device. The trainer's
figure is its own `images_per_s` (log intervals, excluding eval/sample/checkpoint time, which
are switched off here anyway); the bare loop reuses one batch, so it has no data loading, noise,
label drop, grad-norm, metric accumulation or EMA. Prints both and the overhead in percent.

    python benchmarks/train_overhead.py [--steps 300] [--threads 1] [--preset tiny] [--width 64 ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from tarflow_core.model import TarFlow
from tarflow_core.presets import preset
from tarflow_core.train import objective, train


def bare_loop(cfg, model_cfg, steps: int, device: str) -> float:
    torch.manual_seed(0)
    model = TarFlow(model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    x = torch.rand(cfg.batch_size, model_cfg.in_channels, model_cfg.img_size, model_cfg.img_size, device=device) * 2 - 1
    y = (
        torch.randint(max(1, model_cfg.num_classes), (cfg.batch_size,), device=device)
        if model_cfg.num_classes
        else None
    )
    warm = min(20, steps // 5)
    for i in range(steps + warm):
        if i == warm:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        z, logdet = model(x, y)
        loss = objective(z, logdet, model_cfg.data_dim)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return cfg.batch_size * steps / (time.perf_counter() - t0)


def trainer(cfg, steps: int) -> tuple[float, object]:
    seen = []
    with tempfile.TemporaryDirectory() as d:
        c = cfg.replace(
            run_dir=f"{d}/run",
            max_steps=steps,
            log_every=max(1, steps // 5),
            eval_every=0,
            sample_every=0,
            checkpoint_every=0,
        )
        train(c, emit=seen.append)
    start = next(e for e in seen if e["kind"] == "start")
    rates = [e["images_per_s"] for e in seen if e["kind"] == "train"][1:]  # first interval: warm-up
    from tarflow_core.config import ModelConfig

    return statistics.mean(rates), ModelConfig.from_dict(start["model"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int)
    ap.add_argument("--batch-size", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset).replace(width=args.width, batch_size=args.batch_size, device=args.device)
    t_rates, b_rates = [], []
    for _ in range(args.rounds):  # interleaved, so machine load hits both alike
        rate, model_cfg = trainer(cfg, args.steps)
        t_rates.append(rate)
        b_rates.append(bare_loop(cfg, model_cfg, args.steps, args.device))
    t, b = max(t_rates), max(b_rates)
    print(
        f"model {model_cfg.short_name()} ({TarFlow(model_cfg).num_parameters():,} params), batch {cfg.batch_size}, "
        f"device {args.device}, threads {torch.get_num_threads()}"
    )
    print(f"bare loop : {b:8.1f} images/s  (rounds: {', '.join(f'{r:.0f}' for r in b_rates)})")
    print(f"trainer   : {t:8.1f} images/s  (rounds: {', '.join(f'{r:.0f}' for r in t_rates)})")
    ratios = sorted(bb / tt for bb, tt in zip(b_rates, t_rates))
    print(
        f"overhead  : {100 * (b / t - 1):.1f}% more time per image in the trainer (best vs best); "
        f"median of paired rounds {100 * (ratios[len(ratios) // 2] - 1):.1f}%"
    )


if __name__ == "__main__":
    main()
