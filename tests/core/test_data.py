"""Data sources and the resumable loader, on small files each test writes itself."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tarflow_core.data import DataError, ResumableSampler, detect_kind, make_loader, open_dataset, read_idx

# ---------------------------------------------------------------- helpers


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def rand_u8(rng, *shape) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def all_items(ds):
    imgs, labels = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(imgs), list(labels)


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ---------------------------------------------------------------- digits


def test_digits_splits_shapes_labels():
    train, test = open_dataset("digits", "train"), open_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    assert (len(train), len(test)) == (1500, 297)
    x, y = all_items(test)
    assert x.shape == (297, 1, 8, 8) and x.dtype == torch.uint8
    assert set(y) <= set(range(10)) and train.num_classes == 10 and train.class_names[3] == "3"
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(torch.unique(x).tolist()) <= allowed and x.max() == 255
    assert (train.channels, train.image_size) == (1, 8)
    assert "1500 train images" in train.description
    # deterministic and disjoint
    assert np.array_equal(train.indices, open_dataset("digits").indices)
    assert not set(train.indices) & set(test.indices)
    assert len(open_dataset("digits", "all")) == 1797


def test_digits_resize_and_channels():
    ds = open_dataset("digits", image_size=16, channels=3)
    x, _ = ds[0]
    assert x.shape == (3, 16, 16) and torch.equal(x[0], x[1])


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_split_and_labels(tmp_path, gz):
    rng = np.random.default_rng(0)
    tr_x, tr_y = rand_u8(rng, 12, 28, 28), rng.integers(0, 10, 12).astype(np.uint8)
    te_x, te_y = rand_u8(rng, 5, 28, 28), rng.integers(0, 10, 5).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", tr_x, gz)
    write_idx(tmp_path / "train-labels-idx1-ubyte", tr_y, gz)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", te_x, gz)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", te_y, gz)
    assert detect_kind(str(tmp_path)) == "idx"
    train, test = open_dataset(str(tmp_path)), open_dataset(str(tmp_path), "test")
    assert (len(train), len(test)) == (12, 5)
    x, y = all_items(train)
    assert torch.equal(x[:, 0], torch.from_numpy(tr_x)) and y == tr_y.tolist()
    x, y = all_items(test)
    assert torch.equal(x[:, 0], torch.from_numpy(te_x)) and y == te_y.tolist()
    assert train.num_classes == test.num_classes == max(tr_y.max(), te_y.max()) + 1


def test_idx_single_file_and_bad_header(tmp_path):
    rng = np.random.default_rng(1)
    f = write_idx(tmp_path / "fashion-images-idx3-ubyte", rand_u8(rng, 40, 4, 4), gz=True)
    ds = open_dataset(str(f))
    assert len(ds) == 38 and ds.num_classes == 0 and ds[0][1] == -1
    assert read_idx(f).shape == (40, 4, 4)
    bad = tmp_path / "bad" / "train-images-idx3-ubyte"
    bad.parent.mkdir()
    bad.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 4, 4) + b"\0" * 20)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*header says"):
        open_dataset(str(bad.parent))


def test_idx_label_count_mismatch(tmp_path):
    rng = np.random.default_rng(2)
    write_idx(tmp_path / "train-images-idx3-ubyte", rand_u8(rng, 6, 4, 4))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="expected 6 labels"):
        open_dataset(str(tmp_path))


# ---------------------------------------------------------------- CIFAR


def write_cifar10(root: Path, rng, per_batch=4, batches=2) -> dict:
    root.mkdir(parents=True)
    truth = {}
    for name in [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]:
        data = rand_u8(rng, per_batch, 3 * 32 * 32)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(root / name, "wb") as fh:
            pickle.dump(
                {b"batch_label": name.encode(), b"data": data, b"labels": labels, b"filenames": [b"x.png"] * per_batch},
                fh,
                protocol=2,
            )
        truth[name] = (data, labels)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{k}".encode() for k in range(10)], b"num_vis": 3072}, fh)
    return truth


def test_cifar10_layout_labels_and_split(tmp_path):
    rng = np.random.default_rng(3)
    truth = write_cifar10(tmp_path / "cifar-10-batches-py", rng)
    for spec in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        assert detect_kind(str(spec)) == "cifar"
        train = open_dataset(str(spec))
        test = open_dataset(str(spec), "test")
        assert (len(train), len(test)) == (8, 4)
    x, y = all_items(train)
    want = np.concatenate([truth["data_batch_1"][0], truth["data_batch_2"][0]]).reshape(8, 3, 32, 32)
    assert torch.equal(x, torch.from_numpy(want))
    assert y == truth["data_batch_1"][1] + truth["data_batch_2"][1]
    assert all_items(test)[1] == truth["test_batch"][1]
    assert train.num_classes == 10 and train.class_names[2] == "c2"


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for name, n in (("train", 6), ("test", 2)):
        with open(root / name, "wb") as fh:  # default protocol, str keys
            pickle.dump(
                {"data": rand_u8(rng, n, 3072), "fine_labels": [99] * n, "coarse_labels": [1] * n},
                fh,
                protocol=pickle.HIGHEST_PROTOCOL,
            )
    with open(root / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"f{k}" for k in range(100)]}, fh)
    ds = open_dataset(str(root))
    assert len(ds) == 6 and ds.num_classes == 100 and ds[0][1] == 99 and ds.class_names[99] == "f99"


class Exploit:
    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_cifar_malicious_pickle_refused(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    marker = tmp_path / "pwned"
    Exploit.marker = str(marker)
    with open(root / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": Exploit()}, fh)
    with pytest.raises(DataError, match="data_batch_1.*refused"):
        open_dataset(str(root))
    assert not marker.exists()
    # the same with a reduce to os.system
    with open(root / "data_batch_1", "wb") as fh:
        fh.write(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(DataError, match="os.system is not allowed"):
        open_dataset(str(root))
    assert not marker.exists()


# ---------------------------------------------------------------- arrays


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(5)
    c = 1 if layout == "NHW" else 3
    nchw = rand_u8(rng, 40, c, 6, 6)
    arr = {"NHWC": nchw.transpose(0, 2, 3, 1), "NCHW": nchw, "NHW": nchw[:, 0]}[layout]
    labels = rng.integers(0, 4, 40)
    np.savez(tmp_path / "d.npz", images=arr, labels=labels)
    train, test = open_dataset(str(tmp_path / "d.npz")), open_dataset(str(tmp_path / "d.npz"), "test")
    assert (len(train), len(test)) == (38, 2) and not set(train.indices) & set(test.indices)
    assert (train.channels, train.image_size, train.num_classes) == (c, 6, labels.max() + 1)
    x, y = all_items(train)
    assert torch.equal(x, torch.from_numpy(nchw[train.indices]))
    assert y == labels[train.indices].tolist()


def test_npy_unlabelled(tmp_path):
    arr = np.zeros((3, 5, 5, 3), np.uint8)
    np.save(tmp_path / "a.npy", arr)
    ds = open_dataset(str(tmp_path / "a.npy"), "all")
    assert len(ds) == 3 and ds.num_classes == 0 and ds[2][0].shape == (3, 5, 5) and ds[2][1] == -1


def test_imagenet_rows_one_based(tmp_path):
    rng = np.random.default_rng(6)
    rows = rand_u8(rng, 20, 3 * 8 * 8)
    labels = rng.integers(1, 1001, 20)
    labels[0] = 1000
    np.savez(tmp_path / "train_data_batch_1.npz", data=rows, labels=labels, mean=np.zeros(3))
    np.savez(tmp_path / "val_data.npz", data=rows[:3], labels=labels[:3])
    f = tmp_path / "train_data_batch_1.npz"
    ds = open_dataset(str(f), "all")
    x, y = all_items(ds)
    assert torch.equal(x, torch.from_numpy(rows.reshape(20, 3, 8, 8)))
    assert y == (labels - 1).tolist() and ds.num_classes == 1000
    # the folder of batches: train / val from the file names
    assert detect_kind(str(tmp_path)) == "imagenet-npz"
    assert len(open_dataset(str(tmp_path))) == 20
    val = open_dataset(str(tmp_path), "val")
    assert len(val) == 3 and all_items(val)[1] == (labels[:3] - 1).tolist()


# ---------------------------------------------------------------- folders


def test_class_folder_with_corrupt_image(tmp_path):
    rng = np.random.default_rng(7)
    for cname, n in (("cat", 3), ("dog", 2)):
        for i in range(n):
            save_png(tmp_path / cname / f"{i}.png", rand_u8(rng, 10, 10, 3))
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    ds = open_dataset(str(tmp_path), "all")
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert len(ds) == 5 and ds.skipped == 1 and "1 unreadable file skipped" in ds.description
    assert sorted(all_items(ds)[1]) == [0, 0, 0, 1, 1]
    x, _ = ds[0]
    assert x.shape == (3, 10, 10) and x.dtype == torch.uint8
    train, test = open_dataset(str(tmp_path)), open_dataset(str(tmp_path), "test")
    assert (len(train), len(test)) == (4, 1)


def test_flat_folder_and_own_split(tmp_path):
    rng = np.random.default_rng(8)
    for i in range(3):
        save_png(tmp_path / "flat" / f"{i}.png", rand_u8(rng, 6, 6))
    flat = open_dataset(str(tmp_path / "flat"), "all")
    assert len(flat) == 3 and flat.num_classes == 0 and flat.channels == 1 and flat[0][1] == -1
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            save_png(tmp_path / "split" / split / "a" / f"{i}.png", rand_u8(rng, 6, 6, 3))
    save_png(tmp_path / "split" / "val" / "b" / "x.png", rand_u8(rng, 6, 6, 3))
    train, val = open_dataset(str(tmp_path / "split")), open_dataset(str(tmp_path / "split"), "test")
    assert (len(train), len(val)) == (3, 3)
    assert train.class_names == val.class_names == ["a", "b"]
    assert sorted(all_items(val)[1]) == [0, 0, 1]


def test_folder_resize_center_crop_and_flip(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 tall: left quarter red, right quarter blue
    arr[:, :10, 0] = 255
    arr[:, 30:, 2] = 255
    arr[:, 10:20, 1] = 255  # the left half of the central square is green
    save_png(tmp_path / "img" / "wide.png", arr)
    ds = open_dataset(str(tmp_path / "img"), "all", image_size=8, flip=True)
    x, _ = ds[0]
    assert x.shape == (3, 8, 8)
    assert x[0].max() < 40 and x[2].max() < 40  # red and blue bands cropped away
    assert x[1, :, 1].min() > 200 and x[1, :, 6].max() < 40  # green on the left
    xf, _ = ds[(0, True)]
    assert torch.equal(xf, x.flip(-1))
    gray = open_dataset(str(tmp_path / "img"), "all", channels=1)
    assert gray[0][0].shape == (1, 20, 20)


def _jpeg_bytes(rng, side=32) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rand_u8(rng, side, side, 3)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_truncated_jpeg_skipped_up_front_or_replaced_when_read(tmp_path):
    rng = np.random.default_rng(11)
    for i in range(3):
        (tmp_path / f"ok{i}.jpg").write_bytes(_jpeg_bytes(rng))
    whole = _jpeg_bytes(rng)
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # no end marker: found up front
    ds = open_dataset(str(tmp_path), "all")
    assert len(ds) == 3 and ds.skipped == 1
    # a file that passed the check but no longer decodes when read: replaced by the next image
    (tmp_path / "cut.jpg").write_bytes(whole)
    ds = open_dataset(str(tmp_path), "all")
    assert len(ds) == 4 and ds.skipped == 0 and [f.name for f in ds.files][0] == "cut.jpg"
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.warns(RuntimeWarning, match="cut.jpg: cannot decode image"):
        x0, _ = ds[0]
    assert torch.equal(x0, ds[1][0]) and ds.late_skipped == 1


def test_folder_16_bit_gray_scaled_not_clipped(tmp_path):
    arr = np.full((6, 6), 40000, np.uint16)
    arr[0, 0] = 65535
    Image.fromarray(arr).save(tmp_path / "deep.png")
    ds = open_dataset(str(tmp_path), "all")
    x, _ = ds[0]
    assert ds.channels == 1 and x[0, 1, 1] == round(40000 / 257) and x[0, 0, 0] == 255


def test_folder_defaults_from_every_image(tmp_path):
    rng = np.random.default_rng(12)
    save_png(tmp_path / "a_thumb.png", rand_u8(rng, 8, 8))  # sorts first: gray and small
    for i in range(3):
        save_png(tmp_path / f"b{i}.png", rand_u8(rng, 24, 30, 3))
    ds = open_dataset(str(tmp_path), "all")
    assert (ds.channels, ds.image_size) == (3, 24)
    assert ds[0][0].shape == (3, 24, 24)


def test_folder_with_only_a_train_folder(tmp_path):
    rng = np.random.default_rng(13)
    for cname, n in (("cat", 5), ("dog", 5)):
        for i in range(n):
            save_png(tmp_path / "train" / cname / f"{i}.png", rand_u8(rng, 6, 6, 3))
    train, test = open_dataset(str(tmp_path)), open_dataset(str(tmp_path), "test")
    assert train.class_names == ["cat", "dog"] and (len(train), len(test)) == (9, 1)
    # beside other class folders, "train" is just a class name
    save_png(tmp_path / "zebra" / "0.png", rand_u8(rng, 6, 6, 3))
    assert open_dataset(str(tmp_path), "all").class_names == ["train", "zebra"]


def test_imagenet_folder_class_count_same_in_both_splits(tmp_path):
    rng = np.random.default_rng(14)
    np.savez(tmp_path / "train_data_batch_1.npz", data=rand_u8(rng, 6, 3 * 4 * 4), labels=np.array([1, 2, 3, 1, 2, 3]))
    np.savez(tmp_path / "val_data.npz", data=rand_u8(rng, 2, 3 * 4 * 4), labels=np.array([7, 1]))
    assert open_dataset(str(tmp_path), "train").num_classes == open_dataset(str(tmp_path), "test").num_classes == 7


# ---------------------------------------------------------------- bad sources


def test_bad_sources(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=f"{missing} does not exist.*digits"):
        open_dataset(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images found \(looked for"):
        open_dataset(str(tmp_path / "empty"))
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 3, 3), np.float32))
    with pytest.raises(DataError, match="float.npz: expected uint8.*float32"):
        open_dataset(str(tmp_path / "float.npz"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy"):
        open_dataset(str(tmp_path / "obj.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match="junk.npy: not a .npy/.npz file"):
        open_dataset(str(tmp_path / "junk.npy"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="x.txt is not a recognised"):
        open_dataset(str(tmp_path / "x.txt"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 1 image files"):
        open_dataset(str(tmp_path / "junk"))
    with pytest.raises(DataError, match="the data source is empty"):
        open_dataset("")
    with pytest.raises(DataError, match="unknown data split"):
        open_dataset("digits", "bogus")
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------- sampler / loader


def test_sampler_deterministic_and_epochs_differ():
    a, b = ResumableSampler(100, seed=3), ResumableSampler(100, seed=3)
    assert list(a) == list(b) and sorted(a) == list(range(100))
    b.set_epoch(1)
    assert list(a) != list(b) and sorted(b) == list(range(100))
    assert list(ResumableSampler(100, seed=4)) != list(a)


@pytest.mark.parametrize("n,world", [(100, 4), (103, 4), (5, 3)])
def test_sampler_ranks_disjoint_and_covering(n, world):
    shards = [list(ResumableSampler(n, seed=1, rank=r, world_size=world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(n)) and len(flat) == -(-n // world) * world
    if n % world == 0:
        assert len(set(flat)) == len(flat)


def test_sampler_state_resume_yields_remaining():
    s = ResumableSampler(50, seed=9, epoch=2)
    full = list(s)
    s.index = 17
    state = s.state_dict()
    r = ResumableSampler(50, seed=0)
    r.load_state_dict(state)
    assert list(r) == full[17:] and len(r) == 33


def test_loader_resume_matches_uninterrupted():
    ds = open_dataset("digits", flip=True)
    ref = make_loader(ds, batch_size=256, seed=5)
    batches = [(x, y) for _ in range(2) for x, y in ref]  # two epochs
    assert len(batches) == 2 * (1500 // 256) and ref.epoch == 2
    assert not torch.equal(batches[0][0], batches[len(batches) // 2][0])

    def stream(loader):  # how a trainer iterates: epoch after epoch
        while True:
            yield from loader

    first = make_loader(ds, batch_size=256, seed=5)
    it = stream(first)
    got = [next(it) for _ in range(7)]  # into the second epoch
    state = first.state_dict()
    assert (state["epoch"], state["index"]) == (1, 512)
    assert first.state_dict(include_last=False)["index"] == 256
    resumed = make_loader(ds, batch_size=256, seed=5, start_epoch=state["epoch"], start_index=state["index"])
    got += list(resumed)
    assert len(got) == len(batches) and resumed.epoch == 2
    for (x1, y1), (x2, y2) in zip(got, batches):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_loader_workers_same_batches():
    ds = open_dataset("digits", split="test")
    a = [y for _, y in make_loader(ds, 64, seed=1)]
    b = [y for _, y in make_loader(ds, 64, seed=1, workers=2)]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(a) == len(b) == 4
    with pytest.raises(DataError, match="fewer than one batch of 1000"):
        make_loader(ds, 1000, seed=1)
