"""`tarflow denoise`: one score-based denoising step x + lr_scale * sigma^2 * grad log p(x)."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
import typer

from tarflow_core import flow
from tarflow_core.likelihood import denoise as denoise_step
from tarflow_core.runtime import tf32_in_use

from ..console import info, user_errors
from ..io import check_output, read_inputs, write_output
from ..options import (
    BatchOpt,
    CkptOpt,
    ClassOpt,
    DeviceOpt,
    LabelsOpt,
    MaxBatchOpt,
    PatchOpt,
    StrictOpt,
    ThreadsOpt,
    inputs_argument,
    out_option,
    seed_option,
)
from .common import announce_output, batches, check_model_inputs, load, resolve_device, resolve_labels, skipped_warning
from .numbers import FINITE
from .sampling_setup import resolve_denoise_sigma

InputsArg = inputs_argument("Image files, folders, .npz, .npy, or - for a .npy on stdin (several are read in order).")
SigmaOpt = Annotated[
    Optional[float],
    typer.Option(
        "--sigma", parser=FINITE, help="Noise std \\[default: the checkpoint's training noise].", show_default=False
    ),
]
LrScaleOpt = Annotated[
    float, typer.Option("--lr-scale", parser=FINITE, help="Multiplier on the step (1: Tweedie's estimate).")
]
OutOpt = out_option("X.png grid, folder/, X.npz, X.npy, or - (npy on stdout).")
UnusedSeedOpt = seed_option("Accepted like every command's; the step itself draws nothing random.", hidden=True)


def denoise(
    inputs: InputsArg,
    ckpt: CkptOpt,
    sigma: SigmaOpt = None,
    lr_scale: LrScaleOpt = 1.0,
    class_: ClassOpt = None,
    labels: LabelsOpt = None,
    out: OutOpt = "denoised.png",
    batch_size: BatchOpt = 64,
    max_batch: MaxBatchOpt = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    patch_size: PatchOpt = None,
    seed: UnusedSeedOpt = 0,
    strict: StrictOpt = False,
) -> None:
    """Denoise images with one step along the model's score.

    x + lr_scale * sigma^2 * grad log p(x): Tweedie's estimate of the clean image at lr_scale 1.

    Examples:

      tarflow denoise --ckpt runs/tiny noisy.npy --out clean.png

      tarflow denoise --ckpt runs/tiny noisy/*.png --out clean/

      tarflow sample --ckpt C --no-denoise --out - \\
        | tarflow denoise --ckpt C - --out -
    """
    with user_errors():
        torch.manual_seed(seed)
        check_output(out)
        dev = resolve_device(device, threads)
        model, ck = load(ckpt, dev, patch_size)
        sigma = resolve_denoise_sigma(ck, True, sigma, flag="--sigma", option="--sigma")
        data = read_inputs(inputs, channels=model.config.in_channels, strict=strict)
        check_model_inputs(data, model.config, inputs, verb="denoised")
        skipped = skipped_warning(data, "the output's metadata lists the sources of its images, in order")
        if skipped:
            info(skipped)
        n = len(data.images)
        y = resolve_labels(
            ck, n, class_=class_, labels_path=labels, from_inputs=data.labels, inputs_name=", ".join(inputs)
        )
        images = torch.from_numpy(data.images)
        x = flow.uint8_to_model(images) if data.is_uint8 else images
        result = torch.empty_like(x)
        for start, stop in batches(n, batch_size):
            yb = y[start:stop].to(dev) if y is not None else None
            xb = x[start:stop].to(dev)
            result[start:stop] = denoise_step(model, xb, yb, sigma=sigma, lr_scale=lr_scale, max_batch=max_batch).cpu()
        written = write_output(
            result,
            out,
            labels=y,
            metadata={
                "checkpoint": str(ck.path),
                "denoise_sigma": sigma,
                "lr_scale": lr_scale,
                "threads": torch.get_num_threads(),
                "max_batch": max_batch,
                "tf32": tf32_in_use(dev),
                **({"sources": data.sources, "skipped": data.skipped} if data.skipped else {}),
            },
        )
        plural = "s" if n != 1 else ""
        announce_output(f"denoised {n} image{plural} (sigma {sigma}, lr scale {lr_scale})", written, out)
