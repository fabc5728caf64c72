"""The FID Inception-v3: weight-file layout, forward shapes, TF-compatible resize, finding weights."""

from __future__ import annotations

import hashlib
import io
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tarflow_core.metrics import inception as inc
from tarflow_core.metrics.inception import (
    FIDInceptionV3,
    InceptionWeightsError,
    find_weights,
    load_inception,
    load_weights,
    preprocess,
    resize_bilinear_tf1,
)


def standard_layout() -> dict[str, tuple[int, ...]]:
    """The keys and shapes of pt_inception-2015-12-05-6726825d.pth, written out independently of
    the module: every conv is `<name>.conv.weight` (no bias) + `<name>.bn.{weight,bias,running_mean,
    running_var}`, and `fc` maps 2048 features to 1008 classes."""
    convs: dict[str, tuple[int, int, int, int]] = {
        "Conv2d_1a_3x3": (3, 32, 3, 3),
        "Conv2d_2a_3x3": (32, 32, 3, 3),
        "Conv2d_2b_3x3": (32, 64, 3, 3),
        "Conv2d_3b_1x1": (64, 80, 1, 1),
        "Conv2d_4a_3x3": (80, 192, 3, 3),
    }
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs.update(
            {
                f"{name}.branch1x1": (cin, 64, 1, 1),
                f"{name}.branch5x5_1": (cin, 48, 1, 1),
                f"{name}.branch5x5_2": (48, 64, 5, 5),
                f"{name}.branch3x3dbl_1": (cin, 64, 1, 1),
                f"{name}.branch3x3dbl_2": (64, 96, 3, 3),
                f"{name}.branch3x3dbl_3": (96, 96, 3, 3),
                f"{name}.branch_pool": (cin, pool, 1, 1),
            }
        )
    convs.update(
        {
            "Mixed_6a.branch3x3": (288, 384, 3, 3),
            "Mixed_6a.branch3x3dbl_1": (288, 64, 1, 1),
            "Mixed_6a.branch3x3dbl_2": (64, 96, 3, 3),
            "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3),
        }
    )
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs.update(
            {
                f"{name}.branch1x1": (768, 192, 1, 1),
                f"{name}.branch7x7_1": (768, c7, 1, 1),
                f"{name}.branch7x7_2": (c7, c7, 1, 7),
                f"{name}.branch7x7_3": (c7, 192, 7, 1),
                f"{name}.branch7x7dbl_1": (768, c7, 1, 1),
                f"{name}.branch7x7dbl_2": (c7, c7, 7, 1),
                f"{name}.branch7x7dbl_3": (c7, c7, 1, 7),
                f"{name}.branch7x7dbl_4": (c7, c7, 7, 1),
                f"{name}.branch7x7dbl_5": (c7, 192, 1, 7),
                f"{name}.branch_pool": (768, 192, 1, 1),
            }
        )
    convs.update(
        {
            "Mixed_7a.branch3x3_1": (768, 192, 1, 1),
            "Mixed_7a.branch3x3_2": (192, 320, 3, 3),
            "Mixed_7a.branch7x7x3_1": (768, 192, 1, 1),
            "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
            "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1),
            "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3),
        }
    )
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs.update(
            {
                f"{name}.branch1x1": (cin, 320, 1, 1),
                f"{name}.branch3x3_1": (cin, 384, 1, 1),
                f"{name}.branch3x3_2a": (384, 384, 1, 3),
                f"{name}.branch3x3_2b": (384, 384, 3, 1),
                f"{name}.branch3x3dbl_1": (cin, 448, 1, 1),
                f"{name}.branch3x3dbl_2": (448, 384, 3, 3),
                f"{name}.branch3x3dbl_3a": (384, 384, 1, 3),
                f"{name}.branch3x3dbl_3b": (384, 384, 3, 1),
                f"{name}.branch_pool": (cin, 192, 1, 1),
            }
        )
    assert len(convs) == 94
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (cin, cout, kh, kw) in convs.items():
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{part}"] = (cout,)
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


@pytest.fixture(scope="module")
def net():
    return FIDInceptionV3()


def fake_state(seed: int = 0, with_counters: bool = False) -> dict[str, torch.Tensor]:
    """A state dict in the standard file's layout with plausible random values."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in standard_layout().items():
        if key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(".conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5
        elif key.endswith("bn.weight"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
        if with_counters and key.endswith("running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return state


def test_parameter_names_and_shapes_match_the_standard_weight_file(net):
    own = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert own == standard_layout()
    assert sum(p.numel() for p in net.parameters()) == 23_850_960  # 21.8M convs/bn + 2.06M fc (TF graph incl. logits)


@pytest.fixture(scope="module")
def state():
    return fake_state(1)


def test_standard_state_dict_loads_strictly_with_or_without_batch_counters(net, state):
    load_weights(net, state, "fake")  # as older files have it: no num_batches_tracked
    assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    assert torch.equal(net.Conv2d_1a_3x3.bn.running_var, state["Conv2d_1a_3x3.bn.running_var"])
    counters = {k: v for k, v in net.state_dict().items() if k.endswith("num_batches_tracked")}
    assert len(counters) == 94
    load_weights(net, {**state, **counters}, "fake")
    net.load_state_dict({**state, **counters}, strict=True)  # plain torch strict loading agrees


def test_wrong_weight_files_are_refused_with_the_reason(net, state):
    bad = dict(state)
    bad["Mixed_6b.branch7x7_2.conv.weight"] = torch.zeros(128, 128, 7, 1)
    with pytest.raises(InceptionWeightsError, match=r"wrong shapes.*Mixed_6b.branch7x7_2"):
        load_weights(net, bad, "bad.pth")
    bad = dict(state)
    del bad["fc.bias"]
    bad["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    with pytest.raises(InceptionWeightsError, match=r"missing keys.*fc.bias.*unexpected keys.*AuxLogits"):
        load_weights(net, bad, "bad.pth")


def test_forward_shapes_at_299_and_small_inputs(net):
    x = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    f = net(x)
    assert f.shape == (1, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    small = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8)  # grayscale, resized to 299
    assert net.preprocess(small).shape == (1, 3, 299, 299)
    g = net(small)
    assert g.shape == (1, 2048) and (g >= 0).all()  # after ReLU and mean pooling


def test_small_network_input_and_random_weights_give_finite_features():
    model, tag = load_inception("random:3", size=75)
    assert tag == "random-3"
    f = model(torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8))
    assert f.shape == (3, 2048) and torch.isfinite(f).all() and f.abs().sum() > 0
    small = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)) for _ in range(2)]
    for m in small:
        inc.random_init(m, seed=3)
    assert torch.equal(small[0][0].weight, small[1][0].weight)  # seeded
    assert torch.equal(small[0][1].running_var, torch.ones(4))
    with pytest.raises(ValueError):
        FIDInceptionV3(size=60)


def test_tf1_bilinear_resize_matches_the_legacy_rule():
    x = torch.tensor([[[[0.0, 10.0]]]])  # 1 x 2 row
    x = x.expand(1, 1, 2, 2).clone()
    out = resize_bilinear_tf1(x, 4)
    # source coordinate i * 2/4 = 0, .5, 1, 1.5 -> values 0, 5, 10, 10 (upper neighbour clamped)
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    # an independent numpy version of the same rule on random data
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 255, size=(2, 3, 7, 5)).astype(np.float32)
    got = resize_bilinear_tf1(torch.from_numpy(a), 11).numpy()

    def ref_axis(n_in, n_out):
        src = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    ylo, yhi, dy = ref_axis(7, 11)
    xlo, xhi, dx = ref_axis(5, 11)
    top = a[..., ylo, :][..., xlo] + (a[..., ylo, :][..., xhi] - a[..., ylo, :][..., xlo]) * dx
    bot = a[..., yhi, :][..., xlo] + (a[..., yhi, :][..., xhi] - a[..., yhi, :][..., xlo]) * dx
    want = top + (bot - top) * dy[:, None]
    assert np.allclose(got, want, atol=1e-4)
    assert torch.equal(resize_bilinear_tf1(x, 2), x)  # same size: untouched
    const = torch.full((1, 3, 8, 8), 77.0)
    assert torch.allclose(resize_bilinear_tf1(const, 299), torch.full((1, 3, 299, 299), 77.0))


def test_preprocessing_modes():
    x = torch.randint(0, 256, (2, 3, 9, 9), dtype=torch.uint8)
    tf = preprocess(x, resize="tf", size=80)
    pt = preprocess(x, resize="pytorch", size=80)
    assert tf.shape == pt.shape == (2, 3, 80, 80)
    want_pt = 2 * F.interpolate(x.float() / 255, size=(80, 80), mode="bilinear", align_corners=False) - 1
    assert torch.allclose(pt, want_pt, atol=1e-6)
    assert torch.allclose(tf, (resize_bilinear_tf1(x.float(), 80) - 128) / 128)
    assert tf.min() >= -1 and tf.max() < 1
    same = torch.randint(0, 256, (1, 3, 80, 80), dtype=torch.uint8)
    assert torch.allclose(preprocess(same, size=80), (same.float() - 128) / 128)
    gray = torch.randint(0, 256, (1, 1, 5, 5), dtype=torch.uint8)
    assert torch.equal(preprocess(gray, size=80), preprocess(gray.expand(1, 3, 5, 5), size=80))
    with pytest.raises(ValueError, match="resize"):
        preprocess(x, resize="cubic")


# ------------------------------------------------------------------------------ finding weights


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("TARFLOW_INCEPTION", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return tmp_path


def offline(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


def test_missing_weights_offline_says_where_to_put_the_file(empty_caches, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(InceptionWeightsError) as e:
        find_weights()
    msg = str(e.value)
    assert msg.startswith("Inception weights not found; download ")
    assert inc.WEIGHTS_URL in msg and "--inception-weights" in msg
    assert str(empty_caches / "xdg" / "tarflow" / inc.WEIGHTS_FILENAME) in msg
    cache = empty_caches / "xdg" / "tarflow"
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written left


def test_weights_are_found_in_the_usual_places(empty_caches, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    hub = empty_caches / "torch" / "hub" / "checkpoints" / inc.WEIGHTS_FILENAME
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    assert find_weights() == hub  # where pytorch-fid downloads it
    ours = empty_caches / "xdg" / "tarflow" / inc.WEIGHTS_FILENAME
    ours.parent.mkdir(parents=True)
    ours.write_bytes(b"x")
    assert find_weights() == ours
    env = empty_caches / "elsewhere.pth"
    env.write_bytes(b"x")
    monkeypatch.setenv("TARFLOW_INCEPTION", str(env))
    assert find_weights() == env
    assert find_weights(hub) == hub  # an explicit path wins
    with pytest.raises(InceptionWeightsError, match="--inception-weights .*nope.pth: no such file"):
        find_weights(empty_caches / "nope.pth")
    monkeypatch.setenv("TARFLOW_INCEPTION", str(empty_caches / "gone.pth"))
    with pytest.raises(InceptionWeightsError, match="TARFLOW_INCEPTION"):
        find_weights()


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_verifies_the_checksum(tmp_path, monkeypatch):
    payload = b"pretend these are weights" * 1000
    digest = hashlib.sha256(payload).hexdigest()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(payload))
    target = tmp_path / "w.pth"
    inc.download_weights(target, "https://example.invalid/w.pth", digest[:8])
    assert target.read_bytes() == payload
    bad = tmp_path / "bad.pth"
    with pytest.raises(InceptionWeightsError, match="sha256"):
        inc.download_weights(
            bad, "https://example.invalid/w.pth", "00000000" if digest[:8] != "00000000" else "11111111"
        )
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]  # no bad file, no temporary left


def test_weight_file_round_trip_through_load_inception(tmp_path, state):
    path = tmp_path / "fid.pth"
    torch.save(state, path)
    model, tag = load_inception(path, size=75)
    assert tag == hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    assert torch.equal(model.Mixed_5d.branch5x5_2.conv.weight, state["Mixed_5d.branch5x5_2.conv.weight"])
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(InceptionWeightsError, match="junk.pth"):
        load_inception(tmp_path / "junk.pth")


def test_a_weight_file_whose_name_starts_with_random_is_loaded_not_replaced(tmp_path, monkeypatch):
    """Only `random` and `random:SEED` ask for random weights; `random_init.pth` is a file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "random_inception.pth").write_bytes(b"not weights")
    with pytest.raises(InceptionWeightsError, match="random_inception.pth"):
        load_inception("random_inception.pth", size=75)
    with pytest.raises(InceptionWeightsError, match="randomx"):
        load_inception("randomx", size=75)
