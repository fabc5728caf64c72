"""One `tarflow eval` run once its options, model and data are settled: the metrics in turn, each
adding its numbers and the settings it used to the report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tarflow_core import __version__
from tarflow_core.chunking import format_bytes
from tarflow_core.metrics import (
    SHARD_SIZE,
    SampleCache,
    accuracy_cost,
    bayes_accuracy,
    dataset_bpd,
    default_stats_path,
    fid_from_stats,
    load_inception,
    load_stats,
)
from tarflow_core.runtime import tf32_in_use
from tarflow_core.sampling import resolve_precision

from ..console import info
from .eval_fid import RANDOM_WEIGHTS_WARNING, FidSetup, reference_stats, sample_stats, stats_meta
from .progress import progress_bar
from .sampling_setup import parse_segments, sampling_denoise_sigma

if TYPE_CHECKING:  # eval imports this module
    from .eval import EvalOptions

# Above this many classes accuracy is no longer cheap (it scores every image once per class), so it
# leaves the default metrics and its cost is told before it starts.
ACCURACY_DEFAULT_MAX_CLASSES = 100


class Evaluation:
    """Computes the chosen metrics of `model` on `dataset` (opened from the source `data`) and
    reports them as one JSON-ready dict."""

    def __init__(self, options: EvalOptions, model, ck, device: torch.device, data: str, dataset, metrics: list[str]):
        self.options, self.model, self.ck, self.device = options, model, ck, device
        self.data, self.dataset, self.wanted = data, dataset, metrics
        cfg = model.config
        self.settings: dict[str, Any] = {
            "data": data,
            "split": dataset.split,
            "metrics": metrics,
            "seed": options.seed,
            "batch_size": options.batch_size,
            "max_batch": options.max_batch,
            "device": str(device),
            "threads": torch.get_num_threads(),  # the numbers depend on it
            "tf32": tf32_in_use(device),  # TF32 products change them too
            "image_shape": [cfg.in_channels, cfg.img_size, cfg.img_size],
            "tarflow_version": __version__,
        }
        self.metrics: dict[str, Any] = {}
        self.num_samples = self.num_images = 0
        self.warnings: list[str] = []

    def run(self) -> dict:
        cfg = self.model.config
        info(
            f"evaluating {self.ck.path} ({cfg.short_name()}, {cfg.in_channels}x{cfg.img_size}x{cfg.img_size}, "
            f"{cfg.num_classes} classes) on {self.dataset.description}: {', '.join(self.wanted)}; device {self.device}"
        )
        fid = self._prepare_fid() if "fid" in self.wanted else None
        if "bpd" in self.wanted:
            self._bpd()
        if "accuracy" in self.wanted:
            self._accuracy()
        if fid is not None:
            self._fid(fid)
        return self._report()

    def _report(self) -> dict:
        report = {
            "metrics": self.metrics,
            "settings": self.settings,
            "num_samples": self.num_samples,
            "num_images": self.num_images,
            "checkpoint": str(self.ck.path),
            "step": self.ck.step,
        }
        if self.warnings:
            report["warnings"] = self.warnings
        return report

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        info(f"warning: {message}")

    # ----------------------------------------------------------------------- FID set-up

    def _prepare_fid(self) -> FidSetup:
        """First of all, so a bad cache, missing weights or a bad statistics file fail before any
        long work."""
        setup = self._sampler_setup()
        fid = self.options.fid
        setup.inception, tag = load_inception(
            fid.inception_weights, self.device, resize=fid.inception_resize, size=fid.inception_size, log=info
        )
        if tag.startswith("random"):
            self._warn(RANDOM_WEIGHTS_WARNING)
        cfg = self.model.config
        setup.stats_path = fid.fid_stats or default_stats_path(
            self.data, self.dataset.split, cfg.in_channels, cfg.img_size, tag, fid.inception_resize, fid.inception_size
        )
        setup.network = f"{tag}/{fid.inception_resize}/{fid.inception_size}"
        if setup.stats_path.is_file():
            setup.reference = load_stats(setup.stats_path)
            made_with, self.settings["fid_reference_images"] = stats_meta(setup.stats_path)
            if made_with is not None and made_with != setup.network:
                self._warn(
                    f"--fid-stats {setup.stats_path} was computed with Inception {made_with}, "
                    f"this run uses {setup.network}"
                )
        self.settings.update(
            inception_weights=setup.inception.weights_source,
            inception_weights_sha256=tag,
            inception_resize=fid.inception_resize,
            inception_size=fid.inception_size,
            fid_batch_size=fid.fid_batch_size,
            fid_stats=str(setup.stats_path),
        )
        return setup

    def _sampler_setup(self) -> FidSetup:
        """The sampler settings for the FID samples, and the sample cache they key."""
        sampling, cfg, ck = self.options.sampling, self.model.config, self.ck
        sigma = sampling_denoise_sigma(ck, sampling)
        sampler = dict(
            **sampling.guidance_settings(),
            sampler=sampling.sampler,
            segments=parse_segments(sampling.segments, cfg.num_blocks, cfg.num_patches, sampling.sampler),
            tol=sampling.tol,
            check_every=sampling.check_every,
            precision=resolve_precision(sampling.precision, self.device),
        )
        sample_cache = self.options.fid.sample_cache
        self.settings.update(
            num_samples=self.options.num_samples,
            **sampler,
            denoise_sigma=sigma,
            denoise_lr_scale=sampling.denoise_lr_scale if sigma else None,
            shard_size=SHARD_SIZE,
            sample_cache=str(sample_cache) if sample_cache else None,
        )
        setup = FidSetup(sampler=sampler, denoise_sigma=sigma)
        if sample_cache is not None:
            setup.cache = SampleCache(
                sample_cache,
                {
                    "checkpoint": str(Path(ck.path).resolve()),
                    "step": ck.step,
                    "model": cfg.to_dict(),
                    "seed": self.options.seed,
                    **sampler,
                    "denoise_sigma": sigma,
                    "denoise_lr_scale": sampling.denoise_lr_scale,
                    "shard_size": SHARD_SIZE,
                },
            )
        return setup

    # ----------------------------------------------------------------------- the metrics

    def _over_the_data(self, label: str, metric: Callable, **extra: Any):
        """`metric` over the whole data set, with a progress bar, seeded by --seed."""
        o = self.options
        with progress_bar(label, len(self.dataset)) as advance:
            return metric(
                self.model,
                self.dataset,
                batch_size=o.batch_size,
                generator=torch.Generator().manual_seed(o.seed),
                device=self.device,
                on_batch=lambda d, t: advance(d),
                max_batch=o.max_batch,
                **extra,
            )

    def _bpd(self) -> None:
        start = time.perf_counter()
        samples = self.options.dequant_samples
        res = self._over_the_data("bpd", dataset_bpd, samples=samples)
        self.metrics.update(bpd=res.bpd, bpd_stderr=res.stderr, nll=res.nll)
        how = f"uniform dequantization x{samples}"
        if res.bpd_uniform is not None:  # a learned q(u | x): bpd is its bound, the uniform figure beside
            self.metrics["bpd_uniform"] = res.bpd_uniform
            how = f"variational bound x{samples}; uniform dequantization {res.bpd_uniform:.4f}"
        self.num_images = res.count
        self.settings.update(dequantize=res.dequant, dequant_samples=samples, bpd_conditioned_on_labels=res.conditioned)
        took = time.perf_counter() - start
        info(f"bpd {res.bpd:.4f} ± {res.stderr:.4f} over {res.count} images ({how}) in {took:.1f} s")

    def _accuracy(self) -> None:
        if self.model.config.num_classes > ACCURACY_DEFAULT_MAX_CLASSES:
            self._tell_accuracy_cost()
        start = time.perf_counter()
        acc = self._over_the_data("accuracy", bayes_accuracy)
        self.metrics.update(accuracy=acc.accuracy)
        self.num_images = acc.count
        self.settings.update(accuracy_rule="argmax_k log p(x|k), uniform prior, uniform dequantization")
        info(f"accuracy {acc.accuracy:.4f} ({acc.correct}/{acc.count}) in {time.perf_counter() - start:.1f} s")

    def _tell_accuracy_cost(self) -> None:
        o = self.options
        cost = accuracy_cost(self.model, len(self.dataset), batch_size=o.batch_size, max_batch=o.max_batch)
        images = f"{cost.images} image{'s' if cost.images != 1 else ''}"
        info(
            f"accuracy: {images} x {cost.classes} classes = {cost.scorings:,} image x class scorings "
            f"(the work of bpd {cost.classes} times over) in {cost.passes:,} passes of up to {cost.pairs_per_pass:,} "
            f"pairs, about {format_bytes(cost.bytes_per_pass)} of activations each"
        )

    def _fid(self, setup: FidSetup) -> None:
        o = self.options
        ref = setup.reference
        if ref is None:
            ref = reference_stats(
                setup.inception, self.dataset, o.fid.fid_batch_size, setup.stats_path, setup.network, o.max_batch
            )
            self.settings["fid_reference_images"] = ref.n
        start = time.perf_counter()
        fake, redrawn, reused = sample_stats(
            self.model,
            setup,
            o.sampling,
            o.num_samples,
            seed=o.seed,
            batch_size=o.batch_size,
            fid_batch_size=o.fid.fid_batch_size,
            max_batch=o.max_batch,
        )
        fid = fid_from_stats(fake, ref)
        self.metrics["fid"] = fid
        self.num_samples = fake.n
        self.settings.update(redrawn=redrawn, samples_from_cache=reused)
        info(f"FID {fid:.4f} from {fake.n} samples ({reused} from the cache) in {time.perf_counter() - start:.1f} s")
