"""Options and helpers shared by the commands: checkpoint, device, seed, labels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

from tarflow_core.checkpoint import CheckpointInfo, load_checkpoint
from tarflow_core.dist import DistError
from tarflow_core.dist import resolve_device as resolve_torch_device
from tarflow_core.model import TarFlow
from tarflow_core.sampling import GUIDE_WHAT, PRECISIONS, SAMPLERS

from ..console import UsageError, info
from ..io import read_labels
from .numbers import FINITE, finite_float, seed_int

CkptOpt = Annotated[
    str,
    typer.Option(
        "--ckpt",
        "-c",
        help="Run directory (its latest checkpoint), native checkpoint directory, or reference .pth file.",
        envvar="TARFLOW_CKPT",
        show_default=False,
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
SeedOpt = Annotated[
    int, typer.Option("--seed", parser=seed_int, help="Random seed: same seed and options give the same output.")
]
PatchOpt = Annotated[
    Optional[int],
    typer.Option(
        "--patch-size",
        min=1,
        help="Patch size of a reference .pth whose file name does not give it.",
        show_default=False,
    ),
]
ClassOpt = Annotated[
    Optional[int],
    typer.Option("--class", help="Use class K for every image (class-conditional models).", show_default=False),
]
LabelsOpt = Annotated[
    Optional[Path], typer.Option("--labels", help="Per-image class labels: a .npy of integers.", show_default=False)
]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]

# sampling options shared by `sample` and `eval`
GuidanceOpt = Annotated[
    float,
    typer.Option(
        "--guidance", "-g", parser=finite_float(minimum=0.0), help="Classifier-free guidance weight w (0: none)."
    ),
]
GuideWhatOpt = Annotated[
    str, typer.Option("--guide-what", help="Guide the log-scale a, the shift b, or both: a, b, ab.")
]
AttnTempOpt = Annotated[
    float, typer.Option("--attn-temp", parser=FINITE, help="Attention temperature of the unconditional guidance pass.")
]
AnnealedOpt = Annotated[
    bool, typer.Option("--annealed/--no-annealed", help="Ramp the guidance weight up along the sequence.")
]
DenoiseOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--denoise/--no-denoise",
        help="One score-based denoising step \\[default: on when the checkpoint was trained with Gaussian noise, or when --denoise-sigma is given].",
        show_default=False,
    ),
]
DenoiseSigmaOpt = Annotated[
    Optional[float],
    typer.Option(
        "--denoise-sigma",
        parser=FINITE,
        help="Noise std for denoising (turns the step on) \\[default: the checkpoint's].",
        show_default=False,
    ),
]
DenoiseLrOpt = Annotated[
    float, typer.Option("--denoise-lr-scale", parser=FINITE, help="Multiplier on the denoising step.")
]
SamplerOpt = Annotated[
    str,
    typer.Option(
        "--sampler",
        help="Inversion method: sequential (token by token), jacobi (parallel fixed-point iteration), gs-jacobi (segments in order, Jacobi inside), or auto (on CUDA: gs-jacobi with per-block settings measured on a few samples, sequential where that is faster; elsewhere sequential, which measures fastest on CPUs).",
    ),
]
SegmentsOpt = Annotated[
    Optional[str],
    typer.Option(
        "--segments",
        help="gs-jacobi segment length: one number, or one per block in inversion order (comma-separated; 1 = sequential) \\[default: measured].",
        show_default=False,
    ),
]
TolOpt = Annotated[
    Optional[float],
    typer.Option(
        "--tol",
        parser=FINITE,
        help="Jacobi samplers: stop iterating when no value changes by more than this \\[default: 1e-4, or 1e-2 in bf16, whose rounding keeps iterates moving by about that much].",
        show_default=False,
    ),
]
CheckEveryOpt = Annotated[
    Optional[int],
    typer.Option(
        "--check-every",
        min=1,
        help="Jacobi samplers: passes between convergence checks (each one waits for the device) \\[default: 1 on CPUs, 4 on CUDA].",
        show_default=False,
    ),
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="Sampling arithmetic: fp32, bf16 (transformer in bfloat16, as the published code samples), or auto (bf16 on CUDA, fp32 elsewhere).",
    ),
]
CudaGraphsOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--cuda-graphs/--no-cuda-graphs",
        help="Replay the fixed-shape sampling steps as CUDA graphs \\[default: on with CUDA].",
        show_default=False,
    ),
]


def check_sampling_options(
    guide_what: str,
    attn_temp: float,
    sampler: str,
    tol: float | None,
    *,
    guidance: float = 0.0,
    annealed: bool = False,
    check_every: int | None = None,
) -> None:
    if guide_what not in GUIDE_WHAT:
        raise UsageError(f"--guide-what {guide_what}: expected one of {', '.join(GUIDE_WHAT)}")
    if not attn_temp > 0:
        raise UsageError(f"--attn-temp {attn_temp}: expected a positive number")
    if sampler not in SAMPLERS:
        raise UsageError(f"--sampler {sampler}: expected one of {', '.join(SAMPLERS)}")
    if tol is not None and not tol >= 0:
        raise UsageError(f"--tol {tol}: expected a number >= 0")
    # options that would change nothing are refused, so nobody believes they did
    if sampler == "sequential":
        for name, value in (("--tol", tol), ("--check-every", check_every)):
            if value is not None:
                raise UsageError(
                    f"{name} {value}: only the Jacobi samplers (jacobi, gs-jacobi, auto) take it, "
                    "not --sampler sequential"
                )
    if guidance == 0:
        for name, given in (
            ("--attn-temp", f" {attn_temp}" if attn_temp != 1.0 else None),
            ("--guide-what", f" {guide_what}" if guide_what != "ab" else None),
            ("--annealed", "" if annealed else None),
        ):
            if given is not None:
                hint = " (it is not a sampling temperature)" if name == "--attn-temp" else ""
                raise UsageError(
                    f"{name}{given}: it shapes the guidance pass, which runs only with --guidance W > 0{hint}"
                )


def check_precision_options(precision: str, cuda_graphs: bool | None, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if cuda_graphs and device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device (this run uses {device})")


def parse_segments(text: str | None, blocks: int, tokens: int, sampler: str) -> int | list[int] | None:
    """--segments: one length, or one per block (comma-separated), each at most `tokens` - 1 (the
    unknowns of a block); only for the samplers that take it."""
    if text is None:
        return None
    if sampler not in ("gs-jacobi", "auto"):
        raise UsageError(f"--segments {text}: only --sampler gs-jacobi (or auto) takes segment lengths, not {sampler}")
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values) or len(values) not in (1, blocks):
        raise UsageError(
            f"--segments {text}: expected a positive integer or {blocks} comma-separated ones (one per block)"
        )
    if max(values) > tokens - 1:
        raise UsageError(
            f"--segments {text}: a segment holds at most {tokens - 1} tokens (the unknowns of a "
            f"{tokens}-token block; that length is plain Jacobi)"
        )
    return values[0] if len(values) == 1 else values


def denoise_sigma(
    info: CheckpointInfo,
    denoise: bool | None,
    sigma: float | None,
    *,
    flag: str = "--denoise",
    option: str = "--denoise-sigma",
    lr_scale: float = 1.0,
    lr_option: str = "--denoise-lr-scale",
) -> float | None:
    """The denoising step's sigma, or None for no denoising (default: on for Gaussian-noise checkpoints,
    and whenever a sigma is given). `flag` and `option` name the command's switch and sigma option in
    messages; a sigma or step scale given with the step off is refused rather than ignored."""
    explicit_off = denoise is False
    if denoise is None:
        denoise = info.noise_std is not None or sigma is not None
    if not denoise:
        if sigma is not None:
            raise UsageError(f"{option} {sigma}: given with --no-{flag.lstrip('-')}; drop one of them")
        if lr_scale != 1.0:
            raise UsageError(
                f"{lr_option} {lr_scale}: given with --no-{flag.lstrip('-')}; drop one of them"
                if explicit_off
                else f"{lr_option} {lr_scale}: checkpoint {info.path} was not trained with Gaussian noise, "
                f"so sampling does not denoise; give {option} SIGMA to add the step"
            )
        return None
    sigma = sigma if sigma is not None else info.noise_std
    if sigma is None:
        raise UsageError(f"{flag}: checkpoint {info.path} does not record a Gaussian training noise std; give {option}")
    if sigma <= 0:
        raise UsageError(f"{option} {sigma}: expected a positive number")
    return sigma


def resolve_device(spec: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device must exist."""
    device = _resolve_device(spec)
    if device.type == "cpu":
        limit_cpu_threads_when_busy()
    return device


def limit_cpu_threads_when_busy() -> None:
    """On a CPU already busy with other work, several intra-op threads wait on each other at every
    small operator (measured: 80x slower token-by-token sampling on 2 shared cores); use one."""
    if "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() <= 1:
        return
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return
    if load > (os.cpu_count() or 1) - 0.5:
        torch.set_num_threads(1)


def check_device_spelling(spec: str) -> None:
    """For commands that put nothing on a device (info): a misspelt --device is still an error,
    but an absent CUDA or MPS is not."""
    text = spec.strip().lower()
    if text == "auto":
        return
    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {spec}: expected auto, cpu, cuda, cuda:N or mps")


def _resolve_device(spec: str) -> torch.device:
    spec = spec.strip().lower()
    if (
        spec == "auto"
        and not torch.cuda.is_available()
        and getattr(torch.backends, "mps", None)
        and torch.backends.mps.is_available()
    ):
        return torch.device("mps")
    try:
        return resolve_torch_device(spec)
    except DistError as e:
        raise UsageError(str(e)) from None


def load(ckpt: str, device: torch.device, patch_size: int | None) -> tuple[TarFlow, CheckpointInfo]:
    if patch_size is not None and patch_size < 1:
        raise UsageError(f"--patch-size {patch_size}: expected a positive integer")
    return load_checkpoint(ckpt, device, patch_size=patch_size)


def check_model_inputs(data, cfg, inputs: list[str], verb: str = "scored") -> None:
    """Images read for `score`/`denoise` must have the model's shape (they are used as they are);
    float ones far outside model space (0..255 pixels saved as floats) get a warning."""
    shape, want = tuple(data.images.shape[1:]), (cfg.in_channels, cfg.img_size, cfg.img_size)
    if shape != want:
        raise UsageError(
            f"{', '.join(inputs)}: images are {'x'.join(map(str, shape))} (CxHxW) but the model expects {'x'.join(map(str, want))} "
            f"(images are {verb} as they are, not resized; `tarflow eval --data` resizes and center-crops)"
        )
    if data.is_uint8 or not len(data.images):
        return
    lo, hi = float(data.images.min()), float(data.images.max())
    if max(abs(lo), abs(hi)) > 4:  # samples stray a little past [-1, 1]; pixels do not
        info(
            f"warning: {', '.join(map(str, inputs))} holds float values from {lo:g} to {hi:g}, but float inputs are "
            "taken as model-space values in [-1, 1]; 8-bit pixels belong in a uint8 array (or PNG files)"
        )


def resolve_labels(
    info: CheckpointInfo,
    num: int | None,
    *,
    class_: int | None,
    labels_path: Path | None,
    from_inputs: np.ndarray | None = None,
    inputs_name: str = "the inputs",
) -> torch.Tensor | None:
    """Labels for `num` images from --class, --labels or the inputs (named `inputs_name` in
    messages); validated against the model. `num` None: as many as the labels file holds."""
    k = info.config.num_classes
    if class_ is not None and labels_path is not None:
        raise UsageError("--class and --labels cannot be used together")
    if (class_ is not None or labels_path is not None) and k == 0:
        opt = "--class" if class_ is not None else "--labels"
        raise UsageError(f"{opt}: checkpoint {info.path} is unconditional; class labels need a class-conditional model")
    if class_ is not None:
        if not 0 <= class_ < k:
            raise UsageError(f"--class {class_}: expected a class in 0..{k - 1}")
        return torch.full((num,), class_, dtype=torch.long)
    if labels_path is not None:
        arr = read_labels(str(labels_path))
        source = f"--labels {labels_path}"
    elif from_inputs is not None and k > 0:
        arr, source = np.asarray(from_inputs, dtype=np.int64), f"the labels stored in {inputs_name}"
    else:
        return None
    if num is not None and len(arr) != num:
        raise UsageError(f"{source}: holds {len(arr)} labels for {num} images")
    bad = arr[(arr < -1) | (arr >= k)]
    if len(bad):
        raise UsageError(f"{source}: label {int(bad[0])} is out of range; expected 0..{k - 1} (or -1 for no class)")
    return torch.as_tensor(arr, dtype=torch.long)


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)
