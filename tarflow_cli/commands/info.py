"""`tarflow info`: what a checkpoint holds."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from tarflow_core.checkpoint import read_info

from ..console import out, require_stdout, to_stdout, user_errors
from ..options import FLAG, CkptOpt, PatchOpt, device_option, seed_option
from .common import check_device_spelling

JsonOpt = Annotated[bool, typer.Option("--json", metavar=FLAG, help="One JSON object on stdout.")]
UnusedDeviceOpt = device_option(
    "Accepted like every command's (checked for spelling); info reads no tensors onto a device.", hidden=True
)
UnusedSeedOpt = seed_option("Accepted like every command's; info draws nothing random.", parser=None, hidden=True)


def info(
    ckpt: CkptOpt,
    as_json: JsonOpt = False,
    patch_size: PatchOpt = None,
    device: UnusedDeviceOpt = "auto",
    seed: UnusedSeedOpt = 0,
) -> None:
    """Show a checkpoint's architecture, parameter count, data shape, classes, noise and step.

    The weight files are checked against the architecture shown (a damaged one is an error).

    Examples:

      tarflow info --ckpt runs/tiny

      tarflow info --ckpt afhq_model_8_768_8_8_0.07.pth --json
    """
    with user_errors():
        require_stdout("info")
        check_device_spelling(device)
        ck = read_info(ckpt, patch_size=patch_size)
        cfg = ck.config
        noise = ck.noise or {}
        summary = {
            "path": ck.path,
            "kind": ck.kind,
            "architecture": cfg.short_name(),
            "mode": "NVP (affine)" if cfg.nvp else "VP (shift only)",
            "block_layers": [cfg.layers(i) for i in range(cfg.num_blocks)],  # model order: data side first
            "model": cfg.to_dict(),
            "parameters": cfg.num_parameters(),
            "data_shape": [cfg.in_channels, cfg.img_size, cfg.img_size],
            "tokens": [cfg.num_patches, cfg.token_dim],
            "classes": cfg.num_classes,
            "class_names": (ck.data or {}).get("class_names"),
            "noise": noise,
            "step": ck.step,
            "ema": ck.has_ema,
            "tarflow_version": ck.tarflow_version,
            "data": ck.data,
        }
        if as_json:
            with to_stdout():
                typer.echo(json.dumps(summary))
            return
        table = _table(ck, summary)
        with to_stdout():
            out.print(table)


def _table(ck, summary: dict) -> Table:
    """The human-readable form of `summary`."""
    cfg = ck.config
    noise = summary["noise"]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    noise_text = {
        "gaussian": f"gaussian, std {noise.get('std')}",
        "uniform": "uniform dequantization",
        "variational": "variational dequantization (a learned q(u|x); likelihoods are its bound)",
    }.get(noise.get("type"), "unknown")
    heads = f"{cfg.num_heads} head{'s' if cfg.num_heads != 1 else ''} of {cfg.head_dim}"
    # deep-shallow: the tag gives each block's layers, from the data side to the noise side
    tag = "patch-width-blocks-layers" + (", data side first" if len(set(summary["block_layers"])) > 1 else "")
    rows = [
        ("checkpoint", f"{ck.path} ({ck.kind})"),
        ("architecture", f"{cfg.short_name()} ({tag}), {heads}, MLP x{cfg.expansion}, {summary['mode']}"),
        ("parameters", f"{summary['parameters']:,}"),
        (
            "data shape",
            f"{cfg.in_channels}x{cfg.img_size}x{cfg.img_size} -> {cfg.num_patches} tokens of {cfg.token_dim}",
        ),
        ("classes", str(cfg.num_classes) if cfg.num_classes else "unconditional"),
        ("noise", noise_text),
        ("step", str(ck.step) if ck.step is not None else "unknown"),
    ]
    if cfg.marginal_bins:  # models without the learned marginal map show no such row, as before
        rows.append(("marginal map", f"learned, {cfg.marginal_bins} bins per channel (before the blocks)"))
    if cfg.dequant == "variational":  # uniform models show no such row, as before
        q = f"{cfg.dequant_layers} couplings of width {cfg.dequant_width}, {cfg.dequantizer_parameters():,} parameters"
        rows.append(("dequantization", f"variational: q(u|x) of {q} (unused by sampling)"))
    if ck.has_ema:
        rows.append(("ema", "yes (sampling uses the EMA weights)"))
    if ck.data.get("source"):
        rows.append(("data", str(ck.data["source"])))
    for k, v in rows:
        table.add_row(k, v)
    return table
