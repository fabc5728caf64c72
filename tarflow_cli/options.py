"""The options several commands share, each defined once, and option groups: dataclasses whose
fields are options (the sampling options of `sample` and `eval`), which a command takes as one
parameter.

Import-light on purpose (typer only, no torch or numpy): `tarflow watch` imports this module and
must start without loading torch.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from .commands.numbers import FINITE, POSITIVE, finite_float, seed_int

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps."
FLAG = ""  # the metavar of an on/off option: the help shows the flag alone, not a `<bool>` value
SEED_HELP = "Random seed: same seed and options give the same output."


def device_option(help: str = DEVICE_HELP, hidden: bool = False) -> Any:
    """--device; commands that put nothing on a device still accept it (scripts pass it to every
    command), `hidden` from their help, which lists only options that do something."""
    return Annotated[str, typer.Option("--device", help=help, hidden=hidden)]


def seed_option(help: str = SEED_HELP, parser: Optional[Callable[[str], int]] = seed_int, hidden: bool = False) -> Any:
    """--seed; commands that draw nothing random still accept it, `hidden` from their help."""
    return Annotated[int, typer.Option("--seed", parser=parser, help=help, hidden=hidden)]


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
DeviceOpt = device_option()
SeedOpt = seed_option()
PatchOpt = Annotated[
    Optional[int],
    typer.Option(
        "--patch-size",
        parser=POSITIVE,
        help="Patch size of a reference .pth whose file name does not give it.",
        show_default=False,
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", parser=POSITIVE, help="Images per batch.")]
# the order of floating-point sums depends on the thread count, so it is chosen, not guessed from the load
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        parser=POSITIVE,
        help="CPU threads torch computes with; results depend on it \\[default: torch's own count, e.g. "
        "OMP_NUM_THREADS].",
        show_default=False,
    ),
]

# bounds the memory of sample's denoising step, score, denoise and eval; the results stay those of one pass
MaxBatchOpt = Annotated[
    Optional[int],
    typer.Option(
        "--max-batch",
        parser=POSITIVE,
        help="The most images (image x class pairs when classifying) one denoising, scoring or Inception pass "
        "holds; a larger batch runs in several passes, with the same results up to rounding \\[default: as many "
        "as the free memory holds on CUDA, the whole batch elsewhere].",
        show_default=False,
    ),
]

# class labels, for `sample`, `score` and `denoise`
ClassOpt = Annotated[
    Optional[int],
    typer.Option("--class", help="Use class K for every image (class-conditional models).", show_default=False),
]
LabelsOpt = Annotated[
    Optional[Path], typer.Option("--labels", help="Per-image class labels: a .npy of integers.", show_default=False)
]


# a folder's unreadable image files are skipped and named in one warning, as `train` skips them
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", metavar=FLAG, help="Refuse unreadable image files in a folder instead of skipping them."),
]


def inputs_argument(help: str) -> Any:
    """The images `score` and `denoise` read."""
    return Annotated[list[str], typer.Argument(metavar="INPUT", help=help, show_default=False)]


def out_option(help: str) -> Any:
    """--out of the commands that write images (each lists the forms in its own words)."""
    return Annotated[str, typer.Option("--out", "-o", help=help)]


# --------------------------------------------------------------------------- option groups


class OptionGroup:
    """Base of the dataclasses whose fields are options: see `with_option_groups`."""


@dataclasses.dataclass(frozen=True)
class SamplingOptions(OptionGroup):
    """How `sample` and `eval` (for FID) draw images, as given on the command line."""

    guidance: Annotated[
        float,
        typer.Option(
            "--guidance", "-g", parser=finite_float(minimum=0.0), help="Classifier-free guidance weight w (0: none)."
        ),
    ] = 0.0
    guide_what: Annotated[
        str, typer.Option("--guide-what", help="Guide the log-scale a, the shift b, or both: a, b, ab.")
    ] = "ab"
    attn_temp: Annotated[
        float,
        typer.Option("--attn-temp", parser=FINITE, help="Attention temperature of the unconditional guidance pass."),
    ] = 1.0
    annealed: Annotated[
        bool,
        typer.Option("--annealed/--no-annealed", metavar=FLAG, help="Ramp the guidance weight up along the sequence."),
    ] = False
    denoise: Annotated[
        Optional[bool],
        typer.Option(
            "--denoise/--no-denoise",
            metavar=FLAG,
            help="One score-based denoising step \\[default: on when the checkpoint was trained with Gaussian "
            "noise, or when --denoise-sigma is given].",
            show_default=False,
        ),
    ] = None
    denoise_sigma: Annotated[
        Optional[float],
        typer.Option(
            "--denoise-sigma",
            parser=FINITE,
            help="Noise std for denoising (turns the step on) \\[default: the checkpoint's].",
            show_default=False,
        ),
    ] = None
    denoise_lr_scale: Annotated[
        float, typer.Option("--denoise-lr-scale", parser=FINITE, help="Multiplier on the denoising step.")
    ] = 1.0
    sampler: Annotated[
        str,
        typer.Option(
            "--sampler",
            help="Inversion method: sequential (token by token), jacobi (parallel fixed-point iteration), "
            "gs-jacobi (segments in order, Jacobi inside), or auto (on CUDA: gs-jacobi with per-block settings "
            "measured on a few samples, sequential where that is faster; elsewhere sequential, which measures "
            "fastest on CPUs).",
        ),
    ] = "auto"
    segments: Annotated[
        Optional[str],
        typer.Option(
            "--segments",
            help="gs-jacobi segment length: one number, or one per block in inversion order (comma-separated; "
            "1 = sequential) \\[default: measured].",
            show_default=False,
        ),
    ] = None
    tol: Annotated[
        Optional[float],
        typer.Option(
            "--tol",
            parser=FINITE,
            help="Jacobi samplers: stop iterating when no value changes by more than this \\[default: 1e-4, or "
            "1e-2 in bf16, whose rounding keeps iterates moving by about that much].",
            show_default=False,
        ),
    ] = None
    check_every: Annotated[
        Optional[int],
        typer.Option(
            "--check-every",
            parser=POSITIVE,
            help="Jacobi samplers: passes between convergence checks (each one waits for the device) "
            "\\[default: 1 on CPUs, 4 on CUDA].",
            show_default=False,
        ),
    ] = None
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="Sampling arithmetic: fp32, bf16 (transformer in bfloat16, as the published code samples), or "
            "auto (bf16 on CUDA, fp32 elsewhere).",
        ),
    ] = "auto"
    cuda_graphs: Annotated[
        Optional[bool],
        typer.Option(
            "--cuda-graphs/--no-cuda-graphs",
            metavar=FLAG,
            help="Replay the fixed-shape sampling steps as CUDA graphs \\[default: on with CUDA].",
            show_default=False,
        ),
    ] = None

    def guidance_settings(self) -> dict[str, Any]:
        """The settings of the guidance pass, as `generate` takes them and the outputs record them."""
        return dict(
            guidance=self.guidance, guide_what=self.guide_what, attn_temp=self.attn_temp, annealed=self.annealed
        )


def changed_options(group: OptionGroup) -> list[tuple[str, Any]]:
    """The (field name, value) pairs of `group` that differ from their defaults, in field order."""
    return [(f.name, getattr(group, f.name)) for f in dataclasses.fields(group) if getattr(group, f.name) != f.default]


Command = TypeVar("Command", bound=Callable[..., Any])


def with_option_groups(command: Command) -> Command:
    """Let `command` take an option group as one parameter (`sampling: SamplingOptions =
    SamplingOptions()`). Typer sees the group's fields as ordinary options where that parameter
    stands, so --help lists them there in field order; the command receives one instance built
    from the parsed values. A group may hold groups (as fields whose default is a group)."""
    signature = inspect.signature(command, eval_str=True)
    groups = {p.name: type(p.default) for p in signature.parameters.values() if isinstance(p.default, OptionGroup)}
    parameters: list[inspect.Parameter] = []
    for p in signature.parameters.values():
        parameters += _fields_as_parameters(groups[p.name]) if p.name in groups else [p]
    names = [p.name for p in parameters]
    if len(names) != len(set(names)):
        raise TypeError(f"{command.__name__}: an option group's field has the name of another parameter")

    @functools.wraps(command)
    def run(**values: Any) -> Any:
        for name, group in groups.items():
            values[name] = _gather(group, values)
        return command(**values)

    # typer reads the options from the signature and their types from the annotations
    run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in parameters}
    return run  # type: ignore[return-value]


def _fields_as_parameters(group: type) -> list[inspect.Parameter]:
    """The options of `group`, in field order; a group inside it stands for its own options."""
    hints = inspect.get_annotations(group, eval_str=True)
    parameters = []
    for f in dataclasses.fields(group):
        if isinstance(f.default, OptionGroup):
            parameters += _fields_as_parameters(type(f.default))
        else:
            kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
            parameters.append(inspect.Parameter(f.name, kind, default=f.default, annotation=hints[f.name]))
    return parameters


def _gather(group: type, values: dict[str, Any]) -> OptionGroup:
    """An instance of `group` from the parsed `values` of its options (taken out of `values`)."""
    fields = {
        f.name: _gather(type(f.default), values) if isinstance(f.default, OptionGroup) else values.pop(f.name)
        for f in dataclasses.fields(group)
    }
    return group(**fields)
