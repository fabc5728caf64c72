"""`tarflow eval`: bits/dim over a data set, FID against reference statistics, Bayes accuracy."""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import numpy as np
import torch
import typer

from tarflow_core import __version__
from tarflow_core.data import DataError, open_dataset
from tarflow_core.data.base import normalize_split
from tarflow_core.metrics import (
    SHARD_SIZE,
    InceptionWeightsError,
    SampleCache,
    SampleCacheError,
    StatsError,
    bayes_accuracy,
    dataset_bpd,
    default_stats_path,
    fid_from_stats,
    image_stats,
    load_inception,
    load_stats,
    sample_shards,
    save_stats,
)
from tarflow_core.metrics.common import ordered_batches
from tarflow_core.metrics.inception import INPUT_SIZE, MIN_INPUT_SIZE, RESIZE_MODES, WEIGHTS_FILENAME
from tarflow_core.sampling import resolve_precision

from ..console import UsageError, info, require_stdout, to_stdout, user_errors
from ..io import strict_json
from .common import (
    AnnealedOpt,
    AttnTempOpt,
    BatchOpt,
    CkptOpt,
    DenoiseLrOpt,
    DenoiseOpt,
    DenoiseSigmaOpt,
    DeviceOpt,
    CheckEveryOpt,
    CudaGraphsOpt,
    GuidanceOpt,
    GuideWhatOpt,
    PatchOpt,
    PrecisionOpt,
    SamplerOpt,
    SeedOpt,
    SegmentsOpt,
    TolOpt,
    check_precision_options,
    check_sampling_options,
    load,
    parse_segments,
    resolve_device,
)
from .common import denoise_sigma as resolve_denoise_sigma
from .progress import progress_bar

METRICS = ("bpd", "fid", "accuracy")
RANDOM_WEIGHTS_WARNING = (
    "FID computed with randomly initialised Inception weights: a plumbing check only, "
    "not comparable to any published FID"
)


def eval_cmd(
    ckpt: CkptOpt,
    data: Annotated[
        Optional[str],
        typer.Option(
            "--data",
            "-d",
            help="Data source: digits, an image folder, .npz/.npy, MNIST IDX, or CIFAR batches \\[default: the data the checkpoint was trained on].",
            show_default=False,
        ),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="train, test (val) or all.")] = "test",
    metrics: Annotated[
        Optional[str],
        typer.Option(
            "--metrics",
            "-m",
            help="Comma-separated: bpd, fid, accuracy (default: bpd, plus accuracy for a class-conditional model on labelled data).",
            show_default=False,
        ),
    ] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, help="Samples drawn for FID.")] = 50000,
    batch_size: BatchOpt = 256,
    dequant_samples: Annotated[
        int, typer.Option("--dequant-samples", min=1, help="bpd: average over K uniform dequantization draws.")
    ] = 1,
    guidance: GuidanceOpt = 0.0,
    guide_what: GuideWhatOpt = "ab",
    attn_temp: AttnTempOpt = 1.0,
    annealed: AnnealedOpt = False,
    denoise: DenoiseOpt = None,
    denoise_sigma: DenoiseSigmaOpt = None,
    denoise_lr_scale: DenoiseLrOpt = 1.0,
    sampler: SamplerOpt = "auto",
    segments: SegmentsOpt = None,
    tol: TolOpt = None,
    check_every: CheckEveryOpt = None,
    precision: PrecisionOpt = "auto",
    cuda_graphs: CudaGraphsOpt = None,
    fid_stats: Annotated[
        Optional[Path],
        typer.Option(
            "--fid-stats",
            help="Reference statistics .npz (mu, sigma): read if it exists, else computed from --data/--split and written there (default: a cache file keyed by data, split and image size).",
            show_default=False,
        ),
    ] = None,
    inception_weights: Annotated[
        Optional[str],
        typer.Option(
            "--inception-weights",
            help=f"The FID Inception weights ({WEIGHTS_FILENAME}) (default: $TARFLOW_INCEPTION, the cache, or a download). 'random' gives a plumbing check only.",
            show_default=False,
        ),
    ] = None,
    inception_resize: Annotated[
        str,
        typer.Option(
            "--inception-resize",
            help="Resize to 299: tf (TensorFlow 1.x bilinear, as the TF FID graph) or pytorch (as pytorch-fid).",
        ),
    ] = "tf",
    inception_size: Annotated[
        int, typer.Option("--inception-size", hidden=True, help="Inception input size (299; smaller only for tests).")
    ] = INPUT_SIZE,
    fid_batch_size: Annotated[int, typer.Option("--fid-batch-size", min=1, help="Images per Inception batch.")] = 50,
    sample_cache: Annotated[
        Optional[Path],
        typer.Option(
            "--sample-cache",
            help="Folder of sample shards: an interrupted FID run restarted with it continues where it stopped.",
            show_default=False,
        ),
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    patch_size: PatchOpt = None,
) -> None:
    """Evaluate a checkpoint: prints one JSON object with every metric, the settings and counts.

    bpd: mean bits per dimension over the data split with uniform dequantization (the
    reference protocol; equal to `tarflow score` averaged over the same images and seed).
    fid: Fréchet Inception Distance of --num-samples samples (drawn as `tarflow sample` draws
    them) against reference statistics of the data split, with the standard FID Inception-v3.
    accuracy: Bayes-rule classification accuracy of a class-conditional model.

    Examples:

      tarflow eval --ckpt runs/tiny --metrics bpd,accuracy

      tarflow eval --ckpt runs/tiny --metrics fid --num-samples 10000 --sample-cache runs/tiny/fid-samples

      tarflow eval --ckpt in64.pth --data imagenet64/ --split test --metrics fid --guidance 1.5 --fid-stats in64-val.npz
    """
    with user_errors():
        require_stdout("eval")
        try:
            result = _evaluate(**locals())
        except (DataError, StatsError, InceptionWeightsError, SampleCacheError) as e:
            raise UsageError(str(e)) from None
        with to_stdout():
            sys.stdout.write(strict_json(result) + "\n")
            sys.stdout.flush()


def _evaluate(
    *,
    ckpt,
    data,
    split,
    metrics,
    num_samples,
    batch_size,
    dequant_samples,
    guidance,
    guide_what,
    attn_temp,
    annealed,
    denoise,
    denoise_sigma,
    denoise_lr_scale,
    sampler,
    segments,
    tol,
    check_every,
    precision,
    cuda_graphs,
    fid_stats,
    inception_weights,
    inception_resize,
    inception_size,
    fid_batch_size,
    sample_cache,
    seed,
    device,
    patch_size,
) -> dict:
    wanted = _parse_metrics(metrics)
    try:
        normalize_split(split)
    except DataError:
        raise UsageError(f"--split {split}: expected train, test (or val) or all") from None
    if fid_stats is not None and fid_stats.is_dir():
        raise UsageError(
            f"--fid-stats {fid_stats} is a folder; expected a statistics .npz file (read if it exists, "
            "else written there)"
        )
    check_sampling_options(
        guide_what, attn_temp, sampler, tol, guidance=guidance, annealed=annealed, check_every=check_every
    )
    if inception_resize not in RESIZE_MODES:
        raise UsageError(f"--inception-resize {inception_resize}: expected one of {', '.join(RESIZE_MODES)}")
    if inception_size < MIN_INPUT_SIZE:
        raise UsageError(f"--inception-size {inception_size}: expected at least {MIN_INPUT_SIZE}")
    dev = resolve_device(device)
    check_precision_options(precision, cuda_graphs, dev)
    model, ck = load(ckpt, dev, patch_size)
    model.eval()
    cfg = model.config
    explicit = wanted is not None
    wanted = wanted or ["bpd"] + (["accuracy"] if cfg.conditional else [])
    if "accuracy" in wanted and not cfg.conditional:
        raise UsageError(
            f"--metrics accuracy: checkpoint {ck.path} is unconditional; "
            "classification accuracy needs a class-conditional model"
        )
    _refuse_unused_options(wanted, locals())
    if "fid" in wanted and num_samples < 2:
        raise UsageError(f"--num-samples {num_samples}: FID needs at least 2 samples")

    data = data if data is not None else _training_data(ck)
    dataset = open_dataset(data, split, image_size=cfg.img_size, channels=cfg.in_channels)
    if "accuracy" in wanted and not dataset.labelled:
        if explicit:
            raise UsageError(f"--metrics accuracy: data {data} ({split}) has no class labels")
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

    settings: dict[str, Any] = {
        "data": data,
        "split": dataset.split,
        "metrics": wanted,
        "seed": seed,
        "batch_size": batch_size,
        "device": str(dev),
        "image_shape": [cfg.in_channels, cfg.img_size, cfg.img_size],
        "tarflow_version": __version__,
    }
    out: dict[str, Any] = {
        "metrics": {},
        "settings": settings,
        "num_samples": 0,
        "num_images": 0,
        "checkpoint": str(ck.path),
        "step": ck.step,
    }
    warnings: list[str] = []
    info(
        f"evaluating {ck.path} ({cfg.short_name()}, {cfg.in_channels}x{cfg.img_size}x{cfg.img_size}, "
        f"{cfg.num_classes} classes) on {dataset.description}: {', '.join(wanted)}; device {dev}"
    )

    # FID set-up first, so a bad cache, missing weights or a bad statistics file fail before any long work.
    inception = ref = cache = None
    if "fid" in wanted:
        sigma = resolve_denoise_sigma(ck, denoise, denoise_sigma, lr_scale=denoise_lr_scale)
        options = dict(
            guidance=guidance,
            guide_what=guide_what,
            attn_temp=attn_temp,
            annealed=annealed,
            sampler=sampler,
            segments=parse_segments(segments, cfg.num_blocks, cfg.num_patches, sampler),
            tol=tol,
            check_every=check_every,
            precision=resolve_precision(precision, dev),
        )
        settings.update(
            num_samples=num_samples,
            **options,
            denoise_sigma=sigma,
            denoise_lr_scale=denoise_lr_scale if sigma else None,
            shard_size=SHARD_SIZE,
            sample_cache=str(sample_cache) if sample_cache else None,
        )
        if sample_cache is not None:
            cache = SampleCache(
                sample_cache,
                {
                    "checkpoint": str(Path(ck.path).resolve()),
                    "step": ck.step,
                    "model": cfg.to_dict(),
                    "seed": seed,
                    **options,
                    "denoise_sigma": sigma,
                    "denoise_lr_scale": denoise_lr_scale,
                    "shard_size": SHARD_SIZE,
                },
            )
        inception, tag = load_inception(inception_weights, dev, resize=inception_resize, size=inception_size, log=info)
        if tag.startswith("random"):
            warnings.append(RANDOM_WEIGHTS_WARNING)
            info(f"warning: {RANDOM_WEIGHTS_WARNING}")
        stats_path = fid_stats or default_stats_path(
            data, dataset.split, cfg.in_channels, cfg.img_size, tag, inception_resize, inception_size
        )
        network = f"{tag}/{inception_resize}/{inception_size}"
        if stats_path.is_file():
            ref = load_stats(stats_path)
            made_with, settings["fid_reference_images"] = _stats_meta(stats_path)
            if made_with is not None and made_with != network:
                warnings.append(
                    f"--fid-stats {stats_path} was computed with Inception {made_with}, this run uses {network}"
                )
                info(f"warning: {warnings[-1]}")
        settings.update(
            inception_weights=inception.weights_source,
            inception_weights_sha256=tag,
            inception_resize=inception_resize,
            inception_size=inception_size,
            fid_batch_size=fid_batch_size,
            fid_stats=str(stats_path),
        )

    if "bpd" in wanted:
        start = time.perf_counter()
        with progress_bar("bpd", len(dataset)) as advance:
            res = dataset_bpd(
                model,
                dataset,
                batch_size=batch_size,
                generator=torch.Generator().manual_seed(seed),
                samples=dequant_samples,
                device=dev,
                on_batch=lambda d, t: advance(d),
            )
        out["metrics"].update(bpd=res.bpd, bpd_stderr=res.stderr, nll=res.nll)
        out["num_images"] = res.count
        settings.update(
            dequantize="uniform", dequant_samples=dequant_samples, bpd_conditioned_on_labels=res.conditioned
        )
        info(
            f"bpd {res.bpd:.4f} ± {res.stderr:.4f} over {res.count} images "
            f"(uniform dequantization x{dequant_samples}) in {time.perf_counter() - start:.1f} s"
        )

    if "accuracy" in wanted:
        start = time.perf_counter()
        with progress_bar("accuracy", len(dataset)) as advance:
            acc = bayes_accuracy(
                model,
                dataset,
                batch_size=batch_size,
                generator=torch.Generator().manual_seed(seed),
                device=dev,
                on_batch=lambda d, t: advance(d),
            )
        out["metrics"].update(accuracy=acc.accuracy)
        out["num_images"] = acc.count
        settings.update(accuracy_rule="argmax_k log p(x|k), uniform prior, uniform dequantization")
        info(f"accuracy {acc.accuracy:.4f} ({acc.correct}/{acc.count}) in {time.perf_counter() - start:.1f} s")

    if "fid" in wanted:
        if ref is None:
            ref = _reference_stats(inception, dataset, fid_batch_size, Path(settings["fid_stats"]), network)
            settings["fid_reference_images"] = ref.n
        start = time.perf_counter()
        fake, redrawn, reused = _sample_stats(
            model,
            inception,
            num_samples,
            seed=seed,
            batch_size=batch_size,
            fid_batch_size=fid_batch_size,
            cache=cache,
            denoise_sigma=sigma,
            denoise_lr_scale=denoise_lr_scale,
            options=options,
            cuda_graphs=cuda_graphs,
        )
        fid = fid_from_stats(fake, ref)
        out["metrics"]["fid"] = fid
        out["num_samples"] = fake.n
        settings.update(redrawn=redrawn, samples_from_cache=reused)
        info(f"FID {fid:.4f} from {fake.n} samples ({reused} from the cache) in {time.perf_counter() - start:.1f} s")
    if warnings:
        out["warnings"] = warnings
    return out


# options that only FID (sampling and Inception) or only bpd reads
FID_ONLY = (
    "num_samples",
    "guidance",
    "guide_what",
    "attn_temp",
    "annealed",
    "denoise",
    "denoise_sigma",
    "denoise_lr_scale",
    "sampler",
    "segments",
    "tol",
    "check_every",
    "precision",
    "cuda_graphs",
    "fid_stats",
    "inception_weights",
    "inception_resize",
    "inception_size",
    "fid_batch_size",
    "sample_cache",
)
BPD_ONLY = ("dequant_samples",)


def _refuse_unused_options(wanted: list[str], given: dict) -> None:
    """An option the chosen metrics never read is refused rather than ignored (e.g. --guidance with
    --metrics bpd would otherwise look as if it had shaped the result)."""
    defaults = inspect.signature(eval_cmd).parameters
    for names, metric in ((FID_ONLY, "fid"), (BPD_ONLY, "bpd")):
        if metric in wanted:
            continue
        for name in names:
            value, default = given[name], defaults[name].default
            if value != default:
                option = f"--{'' if value is not False else 'no-'}{name.replace('_', '-')}"
                shown = "" if isinstance(value, bool) else f" {value}"
                raise UsageError(
                    f"{option}{shown}: only the {metric} metric uses it, and this run computes "
                    f"{', '.join(wanted)}; add {metric} to --metrics or drop the option"
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


def _stats_meta(path: Path) -> tuple[str | None, int | None]:
    """The Inception weights/preprocessing and image count a stats file records (ours do;
    other tools' files have only mu and sigma)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            network = str(z["inception"]) if "inception" in z.files else None
            count = int(z["num_images"]) if "num_images" in z.files else None
            return network, count
    except Exception:
        return None, None


def _reference_stats(inception, dataset, fid_batch_size: int, path: Path, network: str):
    info(f"computing FID reference statistics of {dataset.description} -> {path}")
    with progress_bar("reference stats", len(dataset)) as advance:
        stats = image_stats(
            inception,
            (images for images, _ in ordered_batches(dataset, fid_batch_size)),
            total=len(dataset),
            on_batch=lambda d, t: advance(d),
        )
    if stats.n < 2:
        raise UsageError(
            f"--data {dataset.name} ({dataset.split}): FID reference statistics need at least 2 images, found {stats.n}"
        )
    mu, sigma = stats.result()
    try:
        save_stats(path, mu, sigma, num_images=stats.n, source=f"{dataset.name}:{dataset.split}", inception=network)
    except OSError as e:
        info(f"warning: could not write FID reference statistics to {path} ({e})")
    return stats


def _sample_stats(
    model,
    inception,
    num: int,
    *,
    seed: int,
    batch_size: int,
    fid_batch_size: int,
    cache,
    denoise_sigma,
    denoise_lr_scale,
    options,
    cuda_graphs,
) -> tuple[Any, int, int]:
    redrawn = reused = 0
    with progress_bar("sampling", num) as advance:

        def chunks() -> Iterator[torch.Tensor]:
            nonlocal redrawn, reused
            for shard in sample_shards(
                model,
                num,
                seed=seed,
                batch_size=batch_size,
                cache=cache,
                denoise_sigma=denoise_sigma,
                denoise_lr_scale=denoise_lr_scale,
                on_progress=lambda d, t: advance(d),
                cuda_graphs=cuda_graphs,
                **options,
            ):
                redrawn += shard.redrawn
                reused += len(shard.images) if shard.cached else 0
                for i in range(0, len(shard.images), fid_batch_size):
                    yield shard.images[i : i + fid_batch_size]

        stats = image_stats(inception, chunks())
    return stats, redrawn, reused


def _parse_metrics(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise UsageError(f"--metrics {text}: expected a comma-separated list of {', '.join(METRICS)}")
    return list(dict.fromkeys(names))
