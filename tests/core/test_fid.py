"""FID: streaming statistics, the Fréchet distance against independent references, stats files,
and the sharded, resumable sample cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tarflow_core.metrics import (
    RunningStats,
    SampleCache,
    SampleCacheError,
    StatsError,
    feature_stats,
    fid_from_stats,
    frechet_distance,
    image_stats,
    load_stats,
    sample_shards,
    save_stats,
    sqrtm_psd,
    to_uint8,
    trace_sqrt_product,
)
from tests.conftest import tiny_model


def random_features(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix) * scale + shift + rng.normal(size=d) * 0.1


def sqrtm_denman_beavers(a: np.ndarray, iters: int = 60) -> np.ndarray:
    """Principal square root of a (not necessarily symmetric) matrix with positive eigenvalues,
    by the Denman-Beavers iteration -- a reference independent of eigen-decompositions."""
    y, z = a.copy(), np.eye(len(a))
    for _ in range(iters):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    return y


def test_fid_matches_an_independent_float64_reference_on_random_features():
    f1, f2 = random_features(400, 24, 0), random_features(300, 24, 1, scale=1.3, shift=0.2)
    mu1, s1 = feature_stats(f1)
    mu2, s2 = feature_stats(f2)
    covmean = sqrtm_denman_beavers(s1 @ s2)
    assert np.allclose(covmean @ covmean, s1 @ s2, atol=1e-9)
    want = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    got = frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - want) < 1e-9 * max(1.0, abs(want)), (got, want)
    assert got == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)  # symmetric


def test_fid_of_diagonal_gaussians_has_a_closed_form():
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])  # one zero variance: singular
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, abs=1e-12)


def test_fid_of_a_set_with_itself_is_zero_even_with_singular_covariance():
    f = random_features(60, 256, 2)  # 60 samples in 256 dims: rank 59
    mu, s = feature_stats(f)
    assert np.linalg.matrix_rank(s) < 256
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-7 * np.trace(s)
    mu2, s2 = feature_stats(random_features(80, 256, 3))
    d = frechet_distance(mu, s, mu2, s2)
    assert np.isfinite(d) and d > 0


def test_low_rank_fid_equals_the_full_computation():
    f1, f2 = random_features(30, 64, 9), random_features(50, 64, 10, scale=0.7, shift=0.3)
    full = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    a, b = RunningStats(64, keep=64).update(f1[:10]).update(f1[10:]), RunningStats(64, keep=64).update(f2)
    assert a.factor() is not None and np.allclose(a.factor().T @ a.factor(), a.sigma)
    for x, y in ((a, b), (a, b.result()), (b.result(), a), (a.result(), b.result())):
        assert fid_from_stats(x, y) == pytest.approx(full, rel=1e-9)
    big = RunningStats(64, keep=20).update(f1)
    assert big.factor() is None and fid_from_stats(big, b) == pytest.approx(full, rel=1e-9)


def test_fid_with_equal_covariances_is_the_squared_mean_distance():
    mu, s = feature_stats(random_features(500, 32, 4))
    shift = np.random.default_rng(5).normal(size=32)
    assert frechet_distance(mu, s, mu + shift, s) == pytest.approx(float(shift @ shift), rel=1e-8, abs=1e-9)


def test_matrix_square_root_of_psd_matrices():
    _, s = feature_stats(random_features(100, 16, 6))
    r = sqrtm_psd(s)
    assert np.allclose(r @ r, s, atol=1e-10) and np.allclose(r, r.T)
    _, s2 = feature_stats(random_features(120, 16, 7))
    assert trace_sqrt_product(s, s2) == pytest.approx(np.trace(sqrtm_denman_beavers(s @ s2)), rel=1e-9)


def test_streaming_statistics_equal_one_shot_statistics():
    f = random_features(1000, 20, 8, shift=50.0)  # a large mean: naive sums of squares would lose digits
    stats = RunningStats(20)
    start = 0
    for size in (1, 7, 300, 2, 690):
        stats.update(torch.from_numpy(f[start : start + size]))  # tensors or arrays
        start += size
    mu, sigma = stats.result()
    assert stats.n == 1000
    assert np.allclose(mu, f.mean(0), rtol=0, atol=1e-10)
    assert np.allclose(sigma, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-10)
    halves = RunningStats(20).update(f[:400]).merge(RunningStats(20).update(f[400:]))
    assert np.allclose(halves.sigma, sigma, atol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        _ = RunningStats(20).update(f[:1]).sigma


def test_image_stats_streams_batches_through_a_feature_network():
    net = lambda x: x.float().flatten(1)[:, :2048]  # noqa: E731 - a stand-in "network"
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    seen = []
    stats = image_stats(
        net, (images[i : i + 4] for i in range(0, 10, 4)), total=10, on_batch=lambda d, t: seen.append(d)
    )
    mu, sigma = feature_stats(images.float().flatten(1)[:, :2048])
    assert seen == [4, 8, 10] and np.allclose(stats.mu, mu) and np.allclose(stats.sigma, sigma)


# ------------------------------------------------------------------------------------ stats files


def test_stats_files_round_trip_and_interoperate(tmp_path):
    rng = np.random.default_rng(0)
    mu, a = rng.normal(size=2048), rng.normal(size=(2048, 40))
    sigma = a @ a.T
    p = tmp_path / "ref.npz"
    save_stats(p, mu, sigma, num_images=40)
    got_mu, got_sigma = load_stats(p)
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    with np.load(p) as z:  # what pytorch-fid reads: f['mu'][:], f['sigma'][:]
        assert z["mu"].shape == (2048,) and z["sigma"].dtype == np.float64
    theirs = tmp_path / "pytorch_fid_style.npz"
    np.savez(theirs, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))  # float32, no extras
    assert load_stats(theirs)[1].dtype == np.float64
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(mu=np.zeros(64), sigma=np.eye(64)), r"mu has shape \(64,\).*expected \(2048,\) and \(2048, 2048\)"),
        (dict(mu=np.zeros(2048), sigma=np.eye(2048)[:100]), "sigma \\(100, 2048\\)"),
        (dict(m=np.zeros(2048), s=np.eye(2048)), "expected arrays 'mu' and 'sigma'"),
        (dict(mu=np.full(2048, np.nan), sigma=np.eye(2048)), "non-finite"),
        (dict(mu=np.zeros(2048), sigma=np.triu(np.ones((2048, 2048)))), "not symmetric"),
    ],
)
def test_bad_stats_files_are_refused_with_the_reason(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(StatsError, match=match) as e:
        load_stats(p)
    assert str(p) in str(e.value)


def test_unreadable_stats_file(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"junk")
    with pytest.raises(StatsError, match="junk.npz: not a .npy/.npz file"):
        load_stats(p)


# ----------------------------------------------------------------------------------- sample cache

SETTINGS = {"checkpoint": "x", "seed": 0, "guidance": 0.0}


def collect(shards):
    return [s for s in shards]


def test_sample_shards_are_deterministic_and_resumable(tmp_path):
    model = tiny_model(seed=1, dtype=torch.float32, num_classes=3)
    plain = collect(sample_shards(model, 10, seed=4, batch_size=3, shard_size=4))
    assert [len(s.images) for s in plain] == [4, 4, 2]
    assert all(s.images.dtype == torch.uint8 and s.images.shape[1:] == (1, 4, 4) for s in plain)
    assert all(s.labels is not None and len(s.labels) == len(s.images) for s in plain)
    # shard i depends only on (seed, i): drawing fewer samples gives the same first shards
    fewer = collect(sample_shards(model, 8, seed=4, batch_size=3, shard_size=4))
    assert all(torch.equal(a.images, b.images) for a, b in zip(plain, fewer))

    cache = SampleCache(tmp_path / "cache", SETTINGS)
    first = collect(sample_shards(model, 10, seed=4, batch_size=3, shard_size=4, cache=cache))
    assert not any(s.cached for s in first)
    assert all(torch.equal(a.images, b.images) for a, b in zip(plain, first))  # cache or not: same samples
    assert sorted(p.name for p in (tmp_path / "cache").glob("shard-*.npz")) == [
        "shard-000000.npz",
        "shard-000001.npz",
        "shard-000002.npz",
    ]
    with np.load(tmp_path / "cache" / "shard-000000.npz") as z:  # the layout FID tools read
        assert z["arr_0"].shape == (4, 4, 4, 1) and z["arr_0"].dtype == np.uint8

    # an interrupted run: shard 1 never got written; the restart reuses 0 and 2 and redraws 1
    (tmp_path / "cache" / "shard-000001.npz").unlink()
    resumed = collect(
        sample_shards(model, 10, seed=4, batch_size=3, shard_size=4, cache=SampleCache(tmp_path / "cache", SETTINGS))
    )
    assert [s.cached for s in resumed] == [True, False, True]
    assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(plain, resumed))
    # a damaged shard is drawn again rather than trusted
    (tmp_path / "cache" / "shard-000002.npz").write_bytes(b"half a file")
    again = collect(
        sample_shards(model, 10, seed=4, batch_size=3, shard_size=4, cache=SampleCache(tmp_path / "cache", SETTINGS))
    )
    assert [s.cached for s in again] == [True, True, False]
    assert torch.equal(again[2].images, plain[2].images)


def test_sample_cache_refuses_other_settings(tmp_path):
    SampleCache(tmp_path / "c", SETTINGS)
    with pytest.raises(SampleCacheError, match=r"different settings \(guidance\)"):
        SampleCache(tmp_path / "c", {**SETTINGS, "guidance": 2.0})
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "shard-000000.npz").write_bytes(b"")
    with pytest.raises(SampleCacheError, match="no manifest.json"):
        SampleCache(tmp_path / "orphan", SETTINGS)


def test_to_uint8_rounds_like_tarflow_sample():
    from tarflow_cli.io import to_uint8 as cli_to_uint8

    x = torch.linspace(-1.2, 1.2, 1001).view(1, 1, 7, 143)
    assert np.array_equal(to_uint8(x).numpy(), cli_to_uint8(x.numpy()))
