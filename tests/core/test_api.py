"""The Python API as users call it: the argument forms it accepts and the errors it raises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tarflow_core import bpd, denoise, nll
from tests.conftest import tiny_model


def _x(model, n=2, seed=0):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c.in_channels, c.img_size, c.img_size, generator=g, dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize(
    "form",
    [[2, 0], np.array([2, 0]), np.array([2, 0], dtype=np.uint8), torch.tensor([2, 0], dtype=torch.int32)],
    ids=["list", "numpy", "numpy-u8", "int32"],
)
def test_labels_in_any_integer_form_mean_the_same_classes(form):
    model = tiny_model(num_classes=3)
    x, y = _x(model), torch.tensor([2, 0])
    noise = torch.randn(2, model.config.num_patches, model.config.token_dim, dtype=torch.float64)
    z, ld = model(x, y)
    z2, ld2 = model(x, form)
    assert torch.equal(z, z2) and torch.equal(ld, ld2)
    assert torch.equal(model.sample(noise, form, guidance=1.0), model.sample(noise, y, guidance=1.0))
    assert torch.equal(nll(model, x, form), nll(model, x, y))
    assert torch.equal(denoise(model, x, form, sigma=0.1), denoise(model, x, y, sigma=0.1))


@pytest.mark.parametrize("label", [1, -1])
def test_one_int_label_applies_to_the_whole_batch(label):
    model = tiny_model(num_classes=3)
    x = _x(model)
    noise = torch.randn(2, model.config.num_patches, model.config.token_dim, dtype=torch.float64)
    full = torch.full((2,), label)
    assert torch.equal(model(x, label)[0], model(x, full)[0])
    assert torch.equal(model.sample(noise, label), model.sample(noise, full))
    if label == -1:  # the dropped label is the mean embedding, as no label at all
        assert torch.equal(model(x, label)[0], model(x)[0])


def test_bad_labels_are_clear_errors_naming_them():
    model = tiny_model(num_classes=3)
    x = _x(model)
    noise = torch.randn(2, model.config.num_patches, model.config.token_dim, dtype=torch.float64)
    for call in (
        lambda y: model(x, y),
        lambda y: model.sample(noise, y),
        lambda y: nll(model, x, y),
        lambda y: denoise(model, x, y, sigma=0.1),
    ):
        with pytest.raises(ValueError, match="labels y"):
            call(torch.tensor([0, 1, 2]))  # one label too many
        with pytest.raises(ValueError, match="labels y"):
            call(torch.tensor([[0], [1]]))
        with pytest.raises(TypeError, match="labels y must be integers"):
            call(torch.tensor([0.0, 1.0]))
        with pytest.raises(ValueError, match=r"labels must be in -1..2"):
            call(torch.tensor([0, 5]))  # was an IndexError from the embedding lookup in forward


def test_bad_images_and_noise_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 4, 4\)"):
        model(torch.zeros(2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be floating-point"):
        model(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="noise must be a tensor"):
        model.sample(torch.zeros(1, 4, 4).tolist())
    with pytest.raises(TypeError, match="x_uint8 must be a uint8 tensor"):
        bpd(model, _x(model))  # model-space floats would be scored as if they were pixel values


def test_images_of_another_float_dtype_are_cast_to_the_models():
    model = tiny_model(dtype=torch.float64)
    x = _x(model)
    z32, _ = model(x.float())
    assert z32.dtype == torch.float64
    assert torch.equal(z32, model(x.float().double())[0])


@pytest.mark.parametrize(
    "bad, error",
    [
        (dict(guidance=float("nan")), ValueError),
        (dict(guidance=float("inf")), ValueError),
        (dict(guidance="2"), TypeError),
        (dict(attn_temp=float("inf")), ValueError),
        (dict(sampler="jacobi", tol=-1.0), ValueError),
        (dict(sampler="jacobi", tol="1e-4"), TypeError),
        (dict(sampler="jacobi", check_every=1.5), ValueError),
    ],
)
def test_bad_sampling_options_are_clear_errors_naming_them(bad, error):
    model = tiny_model()
    noise = torch.randn(1, 4, 4, dtype=torch.float64)
    name = next(iter(k for k in bad if k != "sampler"))
    with pytest.raises(error, match=name):
        model.sample(noise, **bad)


def test_guidance_given_as_a_tensor_or_numpy_number_works():
    model = tiny_model(num_classes=3)
    noise = torch.randn(2, 4, 4, dtype=torch.float64)
    want = model.sample(noise, [0, 1], guidance=1.5)
    assert torch.equal(model.sample(noise, [0, 1], guidance=np.float32(1.5)), want)
    assert torch.equal(model.sample(noise, [0, 1], guidance=torch.tensor(1.5)), want)


@pytest.mark.parametrize("opts", [dict(), dict(guidance=1.0)])
def test_an_empty_batch_samples_to_no_images(opts):
    model = tiny_model(num_classes=3)
    out = model.sample(torch.zeros(0, 4, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long), **opts)
    assert out.shape == (0, 1, 4, 4)


def test_samples_can_be_used_under_autograd():
    """sample runs under inference_mode inside; what it returns must still be an ordinary tensor."""
    model = tiny_model()
    x = model.sample(torch.randn(2, 4, 4, dtype=torch.float64))
    assert not x.is_inference()
    w = torch.ones((), dtype=torch.float64, requires_grad=True)
    (x * w).sum().backward()
    assert w.grad is not None
    with torch.inference_mode():  # inside inference_mode it stays an inference tensor (no copy)
        assert model.sample(torch.randn(2, 4, 4, dtype=torch.float64)).is_inference()


def test_denoise_options_are_checked():
    model = tiny_model()
    x = _x(model)
    with pytest.raises(TypeError, match="sigma"):
        denoise(model, x, sigma="0.1")
    with pytest.raises(ValueError, match="sigma"):
        denoise(model, x, sigma=float("nan"))
    assert torch.equal(denoise(model, x, sigma=np.float64(0.1)), denoise(model, x, sigma=0.1))


def test_generate_takes_labels_in_any_form_and_refuses_mismatched_counts():
    from tarflow_core import generate

    model = tiny_model(num_classes=3)
    c = model.config
    noise = torch.randn(3, c.num_patches, c.token_dim, dtype=torch.float64)

    def run(**kw):
        return generate(model, 3, generator=torch.Generator().manual_seed(0), batch_size=2, noise=noise, **kw)

    want = run(labels=torch.tensor([0, 2, 2]))
    for form in ([0, 2, 2], np.array([0, 2, 2])):
        got = run(labels=form)
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    assert torch.equal(run(labels=2).labels, torch.tensor([2, 2, 2]))
    for bad in (torch.tensor([0, 1]), torch.tensor([0, 1, 2, 0])):  # short was an IndexError, long was kept
        with pytest.raises(ValueError, match="labels y"):
            run(labels=bad)
    with pytest.raises(ValueError, match="noise must have shape"):
        generate(model, 2, generator=torch.Generator(), noise=noise)
    with pytest.raises(ValueError, match="num"):
        generate(model, -1, generator=torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, 2, generator=torch.Generator(), batch_size=0)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_a_half_precision_model_runs_forward_sampling_and_scoring(dtype, tol):
    """model.to(torch.bfloat16): the norms run in float32 (their weights cast too; was a dtype error)."""
    model = tiny_model(dtype=dtype, num_classes=3, var=True)
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    z, logdet = model(x, [0, 1, 2])
    assert z.dtype == dtype and logdet.dtype == torch.float32
    for sampler in ("sequential", "jacobi"):
        back = model.sample(z.float() / model.var.float().sqrt(), [0, 1, 2], sampler=sampler)
        assert back.dtype == dtype and (back.float() - x).abs().max() < tol
    assert torch.isfinite(nll(model, x, [0, 1, 2])).all()
    assert torch.isfinite(denoise(model, x, [0, 1, 2], sigma=0.1).float()).all()


def test_bpd_by_hand_and_its_sample_count():
    import math

    model = tiny_model(num_classes=3, var=True)
    x8 = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    u = torch.rand(x8.shape, generator=torch.Generator().manual_seed(3))
    x = (x8.double() + u.double()) / 256 * 2 - 1
    by_hand = (nll(model, x, [0, 1]) + math.log(128)) / math.log(2)
    got = bpd(model, x8, [0, 1], generator=torch.Generator().manual_seed(3))
    assert torch.allclose(got.double(), by_hand, atol=1e-5)
    with pytest.raises(ValueError, match="samples"):
        bpd(model, x8, [0, 1], samples=0)  # was a division by zero: NaN scores


def test_load_model_places_the_model_on_auto_and_names_a_device_that_is_not_here(tmp_path):
    from tarflow_core import load_model
    from tarflow_core.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ck", tiny_model(dtype=torch.float32), step=1)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert load_model(tmp_path / "ck", device="auto").var.device.type == expected
    with pytest.raises(ValueError, match="device tpu: expected auto, cpu, cuda"):
        load_model(tmp_path / "ck", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda: CUDA is not available"):
            load_model(tmp_path / "ck", device="cuda")


def test_inference_results_are_plain_tensors_without_an_autograd_graph():
    model = tiny_model(num_classes=3)
    x = _x(model)
    x8 = torch.randint(0, 256, x.shape, dtype=torch.uint8)
    from tarflow_core.likelihood import class_log_likelihoods, classify

    results = {
        "nll": nll(model, x, [0, 1]),
        "nll in passes": nll(model, x, [0, 1], max_batch=1),
        "bpd": bpd(model, x8, [0, 1]),
        "class_log_likelihoods": class_log_likelihoods(model, x),
        "classify": classify(model, x),
        "denoise": denoise(model, x, [0, 1], sigma=0.1),
    }
    for name, out in results.items():
        assert out.grad_fn is None and not out.requires_grad, name
