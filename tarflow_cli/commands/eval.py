"""`tarflow eval`: bits/dim over a data set, FID against reference statistics, Bayes accuracy."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from tarflow_core.data import DataError, open_dataset
from tarflow_core.data.base import normalize_split
from tarflow_core.metrics import InceptionWeightsError, SampleCacheError, StatsError
from tarflow_core.metrics.inception import MIN_INPUT_SIZE, RESIZE_MODES

from ..console import UsageError, info, require_stdout, to_stdout, user_errors
from ..io import strict_json
from ..options import (
    BatchOpt,
    CkptOpt,
    DeviceOpt,
    MaxBatchOpt,
    OptionGroup,
    PatchOpt,
    SamplingOptions,
    SeedOpt,
    ThreadsOpt,
    changed_options,
    with_option_groups,
)
from .common import load, resolve_device
from .eval_fid import FidOptions
from .evaluation import ACCURACY_DEFAULT_MAX_CLASSES, Evaluation
from .numbers import POSITIVE
from .sampling_setup import check_precision_options, check_sampling_options

METRICS = ("bpd", "fid", "accuracy")
NUM_SAMPLES = 50000
DEQUANT_SAMPLES = 1


@dataclasses.dataclass(frozen=True)
class EvalOptions(OptionGroup):
    """The options of `tarflow eval` besides --ckpt, in the order --help lists them."""

    data: Annotated[
        Optional[str],
        typer.Option(
            "--data",
            "-d",
            help="Data source: digits, an image folder, .npz/.npy, MNIST IDX, or CIFAR batches \\[default: the "
            "data the checkpoint was trained on].",
            show_default=False,
        ),
    ] = None
    split: Annotated[str, typer.Option("--split", help="train, test (val) or all.")] = "test"
    metrics: Annotated[
        Optional[str],
        typer.Option(
            "--metrics",
            "-m",
            help="Comma-separated: bpd, fid, accuracy (accuracy scores every image once per class) \\[default: bpd, "
            f"plus accuracy for a class-conditional model of at most {ACCURACY_DEFAULT_MAX_CLASSES} classes on "
            "labelled data].",
            show_default=False,
        ),
    ] = None
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", parser=POSITIVE, help="Samples drawn for FID.")] = (
        NUM_SAMPLES
    )
    batch_size: BatchOpt = 256
    max_batch: MaxBatchOpt = None
    dequant_samples: Annotated[
        int,
        typer.Option("--dequant-samples", parser=POSITIVE, help="bpd: average over K dequantization draws."),
    ] = DEQUANT_SAMPLES
    sampling: SamplingOptions = SamplingOptions()
    fid: FidOptions = FidOptions()
    seed: SeedOpt = 0
    device: DeviceOpt = "auto"
    threads: ThreadsOpt = None
    patch_size: PatchOpt = None


@with_option_groups
def eval_cmd(ckpt: CkptOpt, options: EvalOptions = EvalOptions()) -> None:
    """Evaluate a checkpoint: prints one JSON object with every metric, the settings and counts.

    bpd: mean bits per dimension over the data split with uniform dequantization (the
    reference protocol; equal to `tarflow score` averaged over the same images and seed). A model
    trained with --noise variational reports its variational bound, and bpd_uniform beside it.
    fid: Fréchet Inception Distance of --num-samples samples (drawn as `tarflow sample` draws
    them) against reference statistics of the data split, with the standard FID Inception-v3.
    accuracy: Bayes-rule classification accuracy of a class-conditional model.

    Examples:

      tarflow eval --ckpt runs/tiny --metrics bpd,accuracy

      tarflow eval --ckpt runs/tiny --metrics fid --num-samples 10000 \\
        --sample-cache runs/tiny/fid-samples

      tarflow eval --ckpt in64.pth --data imagenet64/ --split test \\
        --metrics fid --guidance 1.5 --fid-stats in64-val.npz
    """
    with user_errors():
        require_stdout("eval")
        try:
            result = _evaluate(ckpt, options)
        except (DataError, StatsError, InceptionWeightsError, SampleCacheError) as e:
            raise UsageError(str(e)) from None
        with to_stdout():
            sys.stdout.write(strict_json(result) + "\n")
            sys.stdout.flush()


def _evaluate(ckpt: str, options: EvalOptions) -> dict:
    """Check the options, load the model, choose the metrics and open the data (refusing what
    cannot work before any long computation), then compute the metrics."""
    given = _check_options(options)
    dev = resolve_device(options.device, options.threads)
    check_precision_options(options.sampling, dev)
    model, ck = load(ckpt, dev, options.patch_size)
    model.eval()
    cfg = model.config
    wanted = _choose_metrics(given, cfg, ck)
    _refuse_unused_options(options, wanted)
    if "fid" in wanted and options.num_samples < 2:
        raise UsageError(f"--num-samples {options.num_samples}: FID needs at least 2 samples")
    data = options.data if options.data is not None else _training_data(ck)
    dataset = open_dataset(data, options.split, image_size=cfg.img_size, channels=cfg.in_channels)
    _check_labels(dataset, data, cfg, ck, wanted, explicit=given is not None)
    return Evaluation(options, model, ck, dev, data, dataset, wanted).run()


def _check_options(options: EvalOptions) -> list[str] | None:
    """The checks that need neither model nor data; returns the --metrics given, parsed."""
    wanted = _parse_metrics(options.metrics)
    try:
        normalize_split(options.split)
    except DataError:
        raise UsageError(f"--split {options.split}: expected train, test (or val) or all") from None
    fid = options.fid
    if fid.fid_stats is not None and fid.fid_stats.is_dir():
        raise UsageError(
            f"--fid-stats {fid.fid_stats} is a folder; expected a statistics .npz file (read if it exists, "
            "else written there)"
        )
    check_sampling_options(options.sampling)
    if fid.inception_resize not in RESIZE_MODES:
        raise UsageError(f"--inception-resize {fid.inception_resize}: expected one of {', '.join(RESIZE_MODES)}")
    if fid.inception_size < MIN_INPUT_SIZE:
        raise UsageError(f"--inception-size {fid.inception_size}: expected at least {MIN_INPUT_SIZE}")
    return wanted


def _choose_metrics(given: list[str] | None, cfg, ck) -> list[str]:
    """--metrics as given, else bpd (plus accuracy for a class-conditional model of at most
    ACCURACY_DEFAULT_MAX_CLASSES classes: it costs the work of bpd once per class)."""
    cheap = cfg.num_classes <= ACCURACY_DEFAULT_MAX_CLASSES
    wanted = list(given) if given is not None else ["bpd"] + (["accuracy"] if cfg.conditional and cheap else [])
    if given is None and cfg.conditional and not cheap:
        info(
            f"note: accuracy is not among the default metrics for a model of {cfg.num_classes} classes (it scores "
            f"every image {cfg.num_classes} times); ask for it with --metrics bpd,accuracy"
        )
    if "accuracy" in wanted and not cfg.conditional:
        raise UsageError(
            f"--metrics accuracy: checkpoint {ck.path} is unconditional; "
            "classification accuracy needs a class-conditional model"
        )
    return wanted


def _refuse_unused_options(options: EvalOptions, wanted: list[str]) -> None:
    """An option the chosen metrics never read is refused rather than ignored (e.g. --guidance with
    --metrics bpd would otherwise look as if it had shaped the result)."""
    only = {  # options that only FID (sampling and Inception) or only bpd reads, changed from their defaults
        "fid": _if_changed("num_samples", options.num_samples, NUM_SAMPLES)
        + changed_options(options.sampling)
        + changed_options(options.fid),
        "bpd": _if_changed("dequant_samples", options.dequant_samples, DEQUANT_SAMPLES),
    }
    for metric, given in only.items():
        if metric in wanted or not given:
            continue
        name, value = given[0]
        option = f"--{'' if value is not False else 'no-'}{name.replace('_', '-')}"
        shown = "" if isinstance(value, bool) else f" {value}"
        raise UsageError(
            f"{option}{shown}: only the {metric} metric uses it, and this run computes "
            f"{', '.join(wanted)}; add {metric} to --metrics or drop the option"
        )


def _if_changed(name: str, value: Any, default: Any) -> list[tuple[str, Any]]:
    return [(name, value)] if value != default else []


def _check_labels(dataset, data: str, cfg, ck, wanted: list[str], *, explicit: bool) -> None:
    """Accuracy needs labelled data with no more classes than the model; a default accuracy is
    dropped (from `wanted`) on unlabelled data. Labels the model cannot take are refused."""
    if "accuracy" in wanted and not dataset.labelled:
        if explicit:
            raise UsageError(f"--metrics accuracy: data {data} ({dataset.split}) has no class labels")
        wanted.remove("accuracy")
    if "accuracy" in wanted and dataset.num_classes > cfg.num_classes:
        raise UsageError(
            f"--metrics accuracy: data {data} has {dataset.num_classes} classes but checkpoint "
            f"{ck.path} models {cfg.num_classes}"
        )
    if dataset.labelled and cfg.conditional and dataset.num_classes > cfg.num_classes:
        raise UsageError(
            f"--data {data}: has {dataset.num_classes} classes but checkpoint {ck.path} models "
            f"{cfg.num_classes}; its labels cannot condition this model"
        )


def _training_data(ck) -> str:
    """The data source a checkpoint records, when it can be opened here; else ask for --data."""
    source = (ck.data or {}).get("source")
    if source is None:
        channels = ck.config.in_channels
        if channels != 1:
            raise UsageError(
                f"--data: give the data to evaluate on (checkpoint {ck.path} does not record its "
                f"training data, and a model of {channels}-channel images is not one of the "
                "embedded grayscale digits)"
            )
        info(f"note: checkpoint {ck.path} does not record its training data; evaluating on digits (give --data)")
        return "digits"
    if source == "digits" or Path(source).expanduser().exists():
        return source
    raise UsageError(
        f"--data: give the data to evaluate on (checkpoint {ck.path} was trained on {source}, which is not here)"
    )


def _parse_metrics(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise UsageError(f"--metrics {text}: expected a comma-separated list of {', '.join(METRICS)}")
    return list(dict.fromkeys(names))
