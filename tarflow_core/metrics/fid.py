"""Fréchet Inception Distance: streaming feature statistics, the distance, and stats files.

FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The trace term needs no general (non-symmetric) matrix square root: S1 S2 is similar to the
symmetric positive semi-definite M = S1^(1/2) S2 S1^(1/2), so tr((S1 S2)^(1/2)) is the sum of
the square roots of M's eigenvalues. Both steps are symmetric eigen-decompositions in float64
with negative round-off eigenvalues clipped to zero, which stays exact for singular covariances
(fewer samples than feature dimensions) where sqrtm-based code needs an epsilon fix-up.

Statistics files are ``.npz`` with ``mu`` (D,) and ``sigma`` (D, D) in float64 -- the format
pytorch-fid and the TTUR / ADM evaluators read and write.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..chunking import fid_bytes_per_row, rows_per_pass, spans
from ..load_errors import describe, file_head, not_numpy
from .inception import FEATURE_DIM


class StatsError(ValueError):
    """A statistics file that cannot be used; the message names it and what was expected."""


# ----------------------------------------------------------------------------- running moments


class RunningStats:
    """Mean and covariance of feature vectors accumulated batch by batch in float64.

    Batches are merged with the pairwise (Chan et al.) update of the mean and the centred
    sum of outer products, so the result equals the one-shot ``mean`` / ``np.cov`` (ddof 1)
    to float64 rounding, whatever the batch sizes.
    """

    def __init__(self, dim: int = FEATURE_DIM, keep: int = 0):
        self.dim = int(dim)
        self.n = 0
        self.mean = np.zeros(self.dim, dtype=np.float64)
        self.m2 = np.zeros((self.dim, self.dim), dtype=np.float64)
        self.keep = int(keep)  # also keep the raw features while there are at most this many
        self._rows: list[np.ndarray] | None = [] if keep > 0 else None

    def update(self, features) -> RunningStats:
        x = _as_f64(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features shaped (B, {self.dim}), got {x.shape}")
        nb = x.shape[0]
        if nb == 0:
            return self
        mb = x.mean(axis=0)
        xc = x - mb
        self._merge(nb, mb, xc.T @ xc)
        if self._rows is not None:
            self._rows = self._rows + [x.copy()] if self.n <= self.keep else None
        return self

    def merge(self, other: RunningStats) -> RunningStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        if other.n:
            self._merge(other.n, other.mean, other.m2)
            self._rows = None
        return self

    def _merge(self, nb: int, mb: np.ndarray, m2b: np.ndarray) -> None:
        n = self.n + nb
        delta = mb - self.mean
        self.m2 += m2b + np.outer(delta, delta) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n

    @property
    def mu(self) -> np.ndarray:
        return self.mean.copy()

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples (have {self.n})")
        s = self.m2 / (self.n - 1)
        return (s + s.T) / 2

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma

    def factor(self) -> np.ndarray | None:
        """F (n, dim) with F^T F = sigma, while the raw features are kept (n <= keep); else None."""
        if not self._rows or self.n < 2:
            return None
        x = np.concatenate(self._rows)
        return (x - self.mean) / np.sqrt(self.n - 1)


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """One-shot mean and covariance (ddof 1) of (N, D) features."""
    x = _as_f64(features)
    mu = x.mean(axis=0)
    xc = x - mu
    return mu, (xc.T @ xc) / (x.shape[0] - 1)


# ----------------------------------------------------------------------------------- distance


def _sym(a: np.ndarray) -> np.ndarray:
    return (a + a.T) / 2


def _clean(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off removed: anything below the rank tolerance
    (size * eps * largest), including negative values, is zero. Without this the square roots
    of ~1e-16 noise in the null space of a singular covariance would add up to a visible bias."""
    tol = len(w) * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 0.0)
    return np.where(w > tol, w, 0.0)


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (round-off eigenvalues zeroed)."""
    w, v = np.linalg.eigh(_sym(np.asarray(a, dtype=np.float64)))
    return (v * np.sqrt(_clean(w))) @ v.T


def _trace_sqrt_eigs(m: np.ndarray) -> float:
    return float(np.sqrt(_clean(np.linalg.eigvalsh(_sym(m)))).sum())


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, via the eigenvalues of S1^(1/2) S2 S1^(1/2)."""
    root = sqrtm_psd(sigma1)
    return _trace_sqrt_eigs(root @ np.asarray(sigma2, dtype=np.float64) @ root)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(value, 0.0)  # a squared distance; only round-off can push it below zero


def fid_from_stats(
    a: RunningStats | tuple[np.ndarray, np.ndarray], b: RunningStats | tuple[np.ndarray, np.ndarray]
) -> float:
    """FID between two sets of statistics, each a :class:`RunningStats` or ``(mu, sigma)``.

    When a side has fewer samples than dimensions and kept its features, its covariance is
    F^T F with F (n, D), and the nonzero eigenvalues of S1 S2 are those of the small matrix
    F1 S2 F1^T (or (F1 F2^T)(F1 F2^T)^T when both sides are small): the same value as
    :func:`frechet_distance` without any D x D eigen-decomposition.
    """
    fa = a.factor() if isinstance(a, RunningStats) else None
    fb = b.factor() if isinstance(b, RunningStats) else None
    if fa is None and fb is not None:
        a, b, fa, fb = b, a, fb, fa
    mu1, s1 = (a.mu, None) if isinstance(a, RunningStats) and fa is not None else _pair(a)
    mu2, s2 = (b.mu, None) if isinstance(b, RunningStats) and fb is not None else _pair(b)
    if fa is None:
        return frechet_distance(mu1, s1, mu2, s2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}")
    if fb is not None:
        c = fa @ fb.T
        m, tr2 = c @ c.T, float((fb * fb).sum())
    else:
        m, tr2 = fa @ s2 @ fa.T, float(np.trace(s2))
    diff = mu1 - mu2
    value = float(diff @ diff + (fa * fa).sum() + tr2 - 2.0 * _trace_sqrt_eigs(m))
    return max(value, 0.0)


def _pair(x) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(x, RunningStats):
        return x.result()
    mu, sigma = x
    return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)


# -------------------------------------------------------------------------------- stats files


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **extra) -> Path:
    """Write ``mu``/``sigma`` (float64) atomically; extra scalar/str entries ride along
    (ignored by other tools). The file is named exactly ``path`` (no ``.npz`` appended)."""
    target = Path(path)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                mu=np.asarray(mu, np.float64),
                sigma=np.asarray(sigma, np.float64),
                **{k: np.asarray(v) for k, v in extra.items()},
            )
    return target


def load_stats(path: str | os.PathLike, dim: int = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate a statistics file: ``mu`` (dim,), ``sigma`` (dim, dim), finite."""
    p = Path(path)
    problem = not_numpy(file_head(p))
    if problem:
        raise StatsError(f"FID statistics {p}: {problem}")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"mu", "sigma"} <= keys:
                raise StatsError(
                    f"FID statistics {p}: expected arrays 'mu' and 'sigma', found {', '.join(sorted(keys)) or 'none'}"
                )
            mu, sigma = z["mu"], z["sigma"]
    except StatsError:
        raise
    except FileNotFoundError:
        raise StatsError(f"FID statistics {p}: no such file") from None
    except Exception as e:
        raise StatsError(f"FID statistics {p}: not a readable .npz file ({describe(e)})") from None
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise StatsError(
            f"FID statistics {p}: mu has shape {mu.shape} and sigma {sigma.shape}; "
            f"expected ({dim},) and ({dim}, {dim}) (2048-d Inception pool features)"
        )
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise StatsError(f"FID statistics {p}: expected floating-point mu and sigma, got {mu.dtype} and {sigma.dtype}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatsError(f"FID statistics {p}: mu or sigma holds non-finite values")
    scale = max(1.0, float(np.abs(sigma).max()))
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise StatsError(f"FID statistics {p}: sigma is not symmetric, so it is not a covariance matrix")
    return mu, sigma


# ------------------------------------------------------------------------ features of images


def image_stats(
    inception,
    batches: Iterable[torch.Tensor],
    *,
    total: int | None = None,
    on_batch: Callable[[int, int | None], None] | None = None,
    keep: int = FEATURE_DIM,
    max_batch: int | None = None,
) -> RunningStats:
    """Stream uint8 image batches (B, 1|3, H, W) through the network into running statistics
    (keeping the raw features while there are at most ``keep``, for :func:`fid_from_stats`);
    each batch in passes of at most ``max_batch`` images (see :func:`image_features`)."""
    stats = RunningStats(FEATURE_DIM, keep=keep)
    done = 0
    for images in batches:
        if len(images) == 0:
            continue
        stats.update(image_features(inception, images, max_batch=max_batch))
        done += len(images)
        if on_batch is not None:
            on_batch(done, total)
    return stats


def image_features(inception, images: torch.Tensor, *, max_batch: int | None = None) -> torch.Tensor:
    """The network's features of ``images``, (B, D), in passes of at most ``max_batch`` images and on
    CUDA of what the free memory holds (``chunking.rows_per_pass``): each image's features are its own
    (eval-mode batch norms), so the passes give the features of one pass."""
    params = inception.parameters() if isinstance(inception, torch.nn.Module) else iter(())
    device = next(params, torch.empty(0)).device
    per_row = fid_bytes_per_row(getattr(inception, "size", 299))
    size = rows_per_pass(len(images), per_row_bytes=per_row, max_batch=max_batch, device=device)
    if size >= len(images):
        return inception(images)
    return torch.cat([inception(images[a:b]) for a, b in spans(len(images), size)])
