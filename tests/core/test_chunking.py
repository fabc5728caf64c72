"""Inference in chunks: denoising, scoring, classification, accuracy and FID features give the
numbers of one pass whatever the pass size (float64, several sizes, 1 and non-divisors)."""

from __future__ import annotations

import pytest
import torch

from tarflow_core import chunking, likelihood
from tarflow_core.metrics import accuracy_cost, bayes_accuracy, dataset_bpd, image_features, image_stats
from tarflow_core.metrics.inception import load_inception
from tests.conftest import tiny_model

SIZES = (1, 2, 3, 5, 100)  # 7 images: 1, non-divisors and more than the batch


@pytest.fixture(scope="module")
def cond():
    return tiny_model(seed=1, var=True, num_classes=3)


def images(n: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.5


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-12)


def test_rows_per_pass_takes_the_batch_the_cap_and_the_budget():
    assert chunking.rows_per_pass(64, per_row_bytes=10) == 64  # off CUDA: no limit measured
    assert chunking.rows_per_pass(64, per_row_bytes=10, max_batch=5) == 5
    assert chunking.rows_per_pass(4, per_row_bytes=10, max_batch=5) == 4
    assert chunking.rows_per_pass(64, per_row_bytes=10, budget=95) == 9
    assert chunking.rows_per_pass(64, per_row_bytes=10, budget=5) == 1  # one row at least
    assert chunking.rows_per_pass(64, per_row_bytes=10, max_batch=3, budget=95) == 3
    assert list(chunking.spans(7, 3)) == [(0, 3), (3, 6), (6, 7)]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_batch"):
            chunking.rows_per_pass(8, per_row_bytes=1, max_batch=bad)


def test_the_budget_is_the_free_cuda_memory_less_a_margin(monkeypatch):
    assert chunking.inference_budget("cpu") is None
    gib = chunking.GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 1 * gib)
    assert chunking.inference_budget(torch.device("cuda:0")) == 12 * gib - chunking.CUDA_MARGIN


def test_estimates_grow_with_the_model():
    small, big = tiny_model(num_classes=3).config, tiny_model(width=32, head_dim=8, num_classes=3).config
    for estimate in (chunking.scoring_bytes_per_row, chunking.denoising_bytes_per_row):
        assert 0 < estimate(small, 4) < estimate(big, 4) and estimate(small, 2) < estimate(small, 4)
    assert chunking.denoising_bytes_per_row(small) > chunking.scoring_bytes_per_row(small)
    assert chunking.fid_bytes_per_row(75) < chunking.fid_bytes_per_row(299)


@pytest.mark.parametrize("labels", [None, "per-image", "one int"])
def test_chunked_denoise_equals_one_pass(cond, labels):
    x = images()
    y = {None: None, "per-image": torch.tensor([0, 1, 2, -1, 0, 1, 2]), "one int": 2}[labels]
    whole = likelihood.denoise(cond, x, y, sigma=0.3, lr_scale=0.7)
    assert not close(whole, x)  # the step moves the images
    for size in SIZES:
        assert close(likelihood.denoise(cond, x, y, sigma=0.3, lr_scale=0.7, max_batch=size), whole)


def test_chunked_denoise_in_inference_mode_and_from_the_budget(cond, monkeypatch):
    x = images()
    whole = likelihood.denoise(cond, x, sigma=0.2)
    with torch.inference_mode():
        x_inf = x.clone()
        assert close(likelihood.denoise(cond, x_inf, sigma=0.2, max_batch=2), whole)
    per_row = chunking.denoising_bytes_per_row(cond.config, 8)
    calls = count_log_prob(monkeypatch)
    monkeypatch.setattr(chunking, "inference_budget", lambda d: 3 * per_row + 1)  # as CUDA would report
    assert close(likelihood.denoise(cond, x, sigma=0.2), whole) and calls == [3, 3, 1]


def count_log_prob(monkeypatch) -> list[int]:
    """The batch of every log_prob pass likelihood makes from now on."""
    calls, real = [], likelihood.log_prob

    def spy(model, x, y=None):
        calls.append(x.shape[0])
        return real(model, x, y)

    monkeypatch.setattr(likelihood, "log_prob", spy)
    return calls


def test_chunked_nll_and_bpd_equal_one_pass(cond):
    x, y = images(), torch.tensor([0, 1, 2, 0, 1, 2, -1])
    whole = likelihood.nll(cond, x, y)
    for size in SIZES:
        assert close(likelihood.nll(cond, x, y, max_batch=size), whole)
    pixels = torch.randint(0, 256, (7, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    bpd = likelihood.bpd(cond, pixels, y, generator=torch.Generator().manual_seed(0), samples=2)
    chunked = likelihood.bpd(cond, pixels, y, generator=torch.Generator().manual_seed(0), samples=2, max_batch=3)
    assert torch.allclose(chunked, bpd, rtol=0, atol=1e-6)  # bpd accumulates in float32


def test_chunked_class_log_likelihoods_equal_one_pass_and_the_stacked_definition(cond, monkeypatch):
    x = images()
    K, B = 3, len(x)
    stacked = x.unsqueeze(0).expand(K, *x.shape).reshape(K * B, *x.shape[1:])
    labels = torch.arange(K).repeat_interleave(B)
    reference = likelihood.log_prob(cond, stacked, labels).view(K, B).t()
    assert torch.equal(likelihood.class_log_likelihoods(cond, x), reference)  # the default: one pass here
    for size in SIZES + (20, 21):  # 21 pairs: up to every pair in one pass
        assert close(likelihood.class_log_likelihoods(cond, x, max_batch=size), reference)
        assert close(likelihood.class_log_likelihoods(cond, x, chunk=size), reference)
    calls = count_log_prob(monkeypatch)
    likelihood.class_log_likelihoods(cond, x, max_batch=8)
    assert calls == [8, 8, 5]
    posterior = likelihood.classify(cond, x)
    assert close(likelihood.classify(cond, x, max_batch=4), posterior)


class Pairs(torch.utils.data.Dataset):
    """uint8 images of the tiny model's shape with labels."""

    def __init__(self, n: int, k: int):
        g = torch.Generator().manual_seed(5)
        self.x = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
        self.y = torch.randint(k, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_dataset_bpd_and_accuracy_with_max_batch_give_the_same_results(cond):
    data = Pairs(10, 3)
    seeded = dict(batch_size=4, generator=None)
    one = dataset_bpd(cond, data, **seeded)
    for size in (1, 3):
        assert abs(dataset_bpd(cond, data, **seeded, max_batch=size).bpd - one.bpd) < 1e-12
    acc = bayes_accuracy(cond, data, **seeded)
    for size in (1, 5, 7):
        chunked = bayes_accuracy(cond, data, **seeded, max_batch=size)
        assert (chunked.predictions == acc.predictions).all() and chunked.correct == acc.correct


def test_accuracy_cost_counts_the_passes_it_will_make(cond, monkeypatch):
    cost = accuracy_cost(cond, 10, batch_size=4, max_batch=5)  # batches 4, 4, 2: 12, 12, 6 pairs
    assert (cost.images, cost.classes, cost.scorings) == (10, 3, 30)
    assert (cost.passes, cost.pairs_per_pass) == (3 + 3 + 2, 5)
    assert cost.bytes_per_pass == 5 * chunking.scoring_bytes_per_row(cond.config, 8)
    calls = count_log_prob(monkeypatch)
    bayes_accuracy(cond, Pairs(10, 3), batch_size=4, max_batch=5)
    assert len(calls) == cost.passes
    assert accuracy_cost(cond, 10, batch_size=4).passes == 3  # one pass per batch under 4096 pairs


def test_chunked_fid_features_equal_one_pass():
    net, _ = load_inception("random", size=75)
    net = net.double()
    pics = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    whole = image_features(net, pics)
    assert torch.equal(whole, net(pics)) and whole.shape == (5, 2048)
    for size in (1, 2, 3):
        assert close(image_features(net, pics, max_batch=size), whole)
    streamed = image_stats(net, [pics[:3], pics[3:]], max_batch=2)
    direct = image_stats(net, [pics[:3], pics[3:]])
    assert abs(streamed.mean - direct.mean).max() < 1e-12 and abs(streamed.m2 - direct.m2).max() < 1e-9


def test_generate_and_fid_shards_denoise_in_passes_with_the_same_images(cond, monkeypatch):
    from tarflow_core.metrics import sample_shards
    from tarflow_core.sampling import generate

    def draw(**kw):
        g = torch.Generator().manual_seed(0)
        return generate(cond, 5, generator=g, batch_size=5, denoise_sigma=0.2, sampler="sequential", **kw).images

    whole = draw()
    calls = count_log_prob(monkeypatch)
    assert close(draw(max_batch=2), whole) and calls == [2, 2, 1]
    options = dict(seed=1, batch_size=5, shard_size=3, denoise_sigma=0.2)
    shards = [list(sample_shards(cond, 5, **options, max_batch=size)) for size in (None, 1)]
    assert all(torch.equal(a.images, b.images) for a, b in zip(*shards))
