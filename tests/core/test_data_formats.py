"""Data sources laid out the way the public data sets ship them (files written here, tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tarflow_core.data import DataError, detect_kind, open_dataset

from .test_data import all_items, rand_u8, save_png, write_idx

# ---------------------------------------------------------------- MNIST-format IDX


def test_idx_folder_with_only_the_train_files_holds_out_a_fixed_fraction(tmp_path):
    """Only train-images/train-labels downloaded: the source has no split of its own, so the
    test split is the fixed held-out fraction of it (as for the single file), not an error."""
    rng = np.random.default_rng(0)
    imgs, labels = rand_u8(rng, 40, 6, 6), rng.integers(0, 10, 40).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", imgs, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz=True)
    train, test = open_dataset(str(tmp_path), "train"), open_dataset(str(tmp_path), "test")
    assert len(train) + len(test) == 40 and len(test) == 2
    x_tr, y_tr = all_items(train)
    x_te, _ = all_items(test)
    seen = {bytes(x.numpy()) for x in x_tr}
    assert not any(bytes(x.numpy()) in seen for x in x_te)  # disjoint
    single = open_dataset(str(tmp_path / "train-images-idx3-ubyte.gz"), "test")
    assert torch.equal(all_items(single)[0], x_te)  # the same held-out images as the file alone
    assert train.num_classes == test.num_classes


def test_idx_emnist_names_give_the_own_split(tmp_path):
    """EMNIST ships `emnist-<set>-train-images-idx3-ubyte.gz` / `emnist-<set>-test-...`."""
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("test", 5)):
        write_idx(tmp_path / f"emnist-balanced-{split}-images-idx3-ubyte", rand_u8(rng, n, 4, 4), gz=True)
        write_idx(tmp_path / f"emnist-balanced-{split}-labels-idx1-ubyte", rng.integers(0, 47, n), gz=True)
    assert len(open_dataset(str(tmp_path), "train")) == 12
    assert len(open_dataset(str(tmp_path), "test")) == 5


def test_idx_impossible_header_size_reported_exactly(tmp_path):
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(bytes([0, 0, 8, 3]) + (4_000_000_000).to_bytes(4, "big") * 2 + (28).to_bytes(4, "big") + bytes(10))
    with pytest.raises(DataError, match=r"\(448000000000000000000 bytes\) but the file holds 10 bytes"):
        open_dataset(str(f))


@pytest.mark.parametrize("with_flat_copies", [False, True])
def test_idx_kaggle_layout_folder_per_file(tmp_path, with_flat_copies):
    """Kaggle's MNIST: each file inside a folder of the same name (train-images-idx3-ubyte/
    train-images-idx3-ubyte, ...), plus dotted copies (train-images.idx3-ubyte) beside them.
    The labels must be found (they were silently dropped: an unconditional run), and the copies
    are the same data, not an ambiguity."""
    rng = np.random.default_rng(13)
    data = {
        "train": (rand_u8(rng, 10, 5, 5), rng.integers(0, 10, 10)),
        "t10k": (rand_u8(rng, 4, 5, 5), np.array([1, 2, 3, 4])),
    }
    for prefix, (x, y) in data.items():
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            name = f"{prefix}-{kind}-ubyte"
            (tmp_path / name).mkdir()
            write_idx(tmp_path / name / name, arr)
            if with_flat_copies:
                write_idx(tmp_path / name.replace("-idx", ".idx"), arr)
    train, test = open_dataset(str(tmp_path), "train"), open_dataset(str(tmp_path), "test")
    assert all_items(train)[1] == data["train"][1].tolist() and all_items(test)[1] == [1, 2, 3, 4]
    assert train.num_classes == 10
    one = open_dataset(str(tmp_path / "t10k-images-idx3-ubyte" / "t10k-images-idx3-ubyte"), "all")
    assert all_items(one)[1] == [1, 2, 3, 4]


def test_idx_macos_resource_forks_ignored(tmp_path):
    """A folder zipped on a Mac unpacks with ._train-images-idx3-ubyte beside each file."""
    rng = np.random.default_rng(17)
    for prefix, n in (("train", 6), ("t10k", 2)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rand_u8(rng, n, 4, 4))
        (tmp_path / f"._{prefix}-images-idx3-ubyte").write_bytes(b"\0\x05\x16\x07" + bytes(60))
    assert len(open_dataset(str(tmp_path), "train")) == 6 and len(open_dataset(str(tmp_path), "test")) == 2


# ---------------------------------------------------------------- downsampled ImageNet


def _imagenet_batch(path, rng, n, side=4, lo=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, labels = rand_u8(rng, n, 3 * side * side), rng.integers(lo, 1001, n)
    np.savez(path, data=rows, labels=labels, mean=rng.random(3 * side * side))
    return rows.reshape(n, 3, side, side), labels - 1


def test_imagenet_download_folders_under_one_parent(tmp_path):
    """As the zips unpack: Imagenet64_train_part1_npz/ (batches 1-5), ..._part2_npz/ (6-10)
    and Imagenet64_val_npz/val_data.npz; the parent is the whole data set, own split."""
    rng = np.random.default_rng(2)
    parts = [
        _imagenet_batch(tmp_path / f"Imagenet64_train_part{1 + (k > 5)}_npz" / f"train_data_batch_{k}.npz", rng, 3)
        for k in (1, 2, 6, 10)
    ]
    val_x, val_y = _imagenet_batch(tmp_path / "Imagenet64_val_npz" / "val_data.npz", rng, 4)
    assert detect_kind(str(tmp_path)) == "imagenet-npz"
    train, test = open_dataset(str(tmp_path), "train"), open_dataset(str(tmp_path), "val")
    x, y = all_items(train)
    assert torch.equal(x, torch.from_numpy(np.concatenate([p[0] for p in parts])))  # batch order 1, 2, 6, 10
    assert y == np.concatenate([p[1] for p in parts]).tolist()
    assert torch.equal(all_items(test)[0], torch.from_numpy(val_x)) and all_items(test)[1] == val_y.tolist()


def test_imagenet_train_folder_alone_holds_out_a_fixed_fraction(tmp_path):
    rng = np.random.default_rng(3)
    x1, _ = _imagenet_batch(tmp_path / "train_data_batch_1.npz", rng, 30)
    x2, _ = _imagenet_batch(tmp_path / "train_data_batch_2.npz", rng, 10)
    train, test = open_dataset(str(tmp_path), "train"), open_dataset(str(tmp_path), "test")
    assert len(train) == 38 and len(test) == 2 and train.num_classes == test.num_classes
    held = {bytes(x.numpy()) for x in all_items(test)[0]}
    assert held.isdisjoint(bytes(x.numpy()) for x in all_items(train)[0])
    assert len(open_dataset(str(tmp_path), "all")) == 40


def test_imagenet_two_data_sets_in_one_parent_refused(tmp_path):
    rng = np.random.default_rng(4)
    _imagenet_batch(tmp_path / "Imagenet32_train_npz" / "train_data_batch_1.npz", rng, 3)
    _imagenet_batch(tmp_path / "Imagenet64_train_npz" / "train_data_batch_1.npz", rng, 3, side=8)
    with pytest.raises(DataError, match="train_data_batch_1.npz appear more than once"):
        open_dataset(str(tmp_path))


# ---------------------------------------------------------------- image folders


def test_folder_exif_rotated_jpeg_is_used_upright(tmp_path):
    """A phone photo: pixels stored landscape (left half white), EXIF orientation 6 (turn 90
    degrees clockwise to view). Viewers show it portrait with the white half on top; so must
    the training images be."""
    from PIL import Image

    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "photos").mkdir()
    Image.fromarray(stored).save(tmp_path / "photos" / "IMG_0001.JPG", exif=exif.tobytes(), quality=95)
    Image.fromarray(stored).save(tmp_path / "photos" / "IMG_0002.JPG", quality=95)  # no tag: as stored
    ds = open_dataset(str(tmp_path / "photos"), "all", image_size=16)
    turned, plain = ds[0][0].float().mean(0), ds[1][0].float().mean(0)
    # upright: 16 wide, 32 high, white on top; the crop keeps rows 8..23
    assert turned[:6].min() > 200 and turned[-6:].max() < 50
    assert plain[:, :6].min() > 200 and plain[:, -6:].max() < 50  # left white, right black


# ---------------------------------------------------------------- .npz arrays


def test_npz_keras_mnist_keys_give_the_own_split(tmp_path):
    """Keras's mnist.npz: x_train (N, 28, 28) uint8, y_train, x_test, y_test."""
    rng = np.random.default_rng(5)
    xtr, ytr = rand_u8(rng, 12, 6, 6), rng.integers(0, 10, 12).astype(np.uint8)
    xte, yte = rand_u8(rng, 4, 6, 6), np.array([9, 0, 1, 2], np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    f = str(tmp_path / "mnist.npz")
    train, test = open_dataset(f, "train"), open_dataset(f, "test")
    assert torch.equal(all_items(train)[0], torch.from_numpy(xtr[:, None])) and all_items(train)[1] == ytr.tolist()
    assert torch.equal(all_items(test)[0], torch.from_numpy(xte[:, None])) and all_items(test)[1] == yte.tolist()
    assert train.num_classes == test.num_classes == 10
    assert len(open_dataset(f, "all")) == 16


def test_npz_medmnist_keys_and_column_labels(tmp_path):
    """MedMNIST: {train,val,test}_images NHWC and {..}_labels shaped (N, 1)."""
    rng = np.random.default_rng(6)
    arrays = {}
    for split, n in (("train", 10), ("val", 3), ("test", 5)):
        arrays[f"{split}_images"] = rand_u8(rng, n, 8, 8, 3)
        arrays[f"{split}_labels"] = rng.integers(0, 4, (n, 1))
    np.savez(tmp_path / "pathmnist.npz", **arrays)
    f = str(tmp_path / "pathmnist.npz")
    test = open_dataset(f, "test")
    x, y = all_items(test)
    assert torch.equal(x, torch.from_numpy(arrays["test_images"].transpose(0, 3, 1, 2)))
    assert y == arrays["test_labels"][:, 0].tolist()
    assert len(open_dataset(f, "train")) == 10 and len(open_dataset(f, "all")) == 18


def test_npz_label_errors_name_the_labels(tmp_path):
    rng = np.random.default_rng(7)
    np.savez(tmp_path / "obj.npz", images=rand_u8(rng, 4, 5, 5), labels=np.array([1, "a", 2, 3], dtype=object))
    with pytest.raises(DataError, match="array 'labels' holds Python objects.*expected integer labels"):
        open_dataset(str(tmp_path / "obj.npz"))
    np.savez(tmp_path / "onehot.npz", images=rand_u8(rng, 4, 5, 5), labels=np.eye(3, dtype=np.int64)[[0, 1, 2, 0]])
    with pytest.raises(DataError, match=r"labels shaped \(4, 3\); one-hot"):
        open_dataset(str(tmp_path / "onehot.npz"))


def _png(path, rng, side=8):
    save_png(path, rand_u8(rng, side, side, 3))


def test_folder_links_followed_broken_links_counted_hidden_folders_ignored(tmp_path):
    rng = np.random.default_rng(8)
    elsewhere = tmp_path / "disk2" / "more_cats"
    for k in range(3):
        _png(elsewhere / f"{k}.png", rng)
    root = tmp_path / "pets"
    for k in range(2):
        _png(root / "cat" / f"{k}.png", rng)
        _png(root / "dog" / f"{k}.png", rng)
    (root / "cat" / "more").symlink_to(elsewhere, target_is_directory=True)  # a linked folder inside a class
    (root / "dog" / "gone.png").symlink_to(tmp_path / "deleted.png")  # a broken link: unreadable, counted
    (root / "dog" / "up").symlink_to(root, target_is_directory=True)  # a link back up: not followed
    _png(root / "dog" / ".thumbnails" / "t.png", rng)  # hidden folder: not data
    ds = open_dataset(str(root), "all")
    names = sorted(f.relative_to(root).as_posix() for f in ds.files)
    assert names == [
        "cat/0.png",
        "cat/1.png",
        "cat/more/0.png",
        "cat/more/1.png",
        "cat/more/2.png",
        "dog/0.png",
        "dog/1.png",
    ]
    assert ds.labels.tolist() == [0] * 5 + [1] * 2 and ds.skipped == 1


def test_folder_permission_problems_are_data_errors_or_counted(tmp_path, monkeypatch):
    """Folders that cannot be listed (no read permission; simulated, as tests may run as root)."""
    import os

    rng = np.random.default_rng(9)
    for cls in ("a", "b"):
        for k in range(3):
            _png(tmp_path / "data" / cls / f"{k}.png", rng)
    denied = {str(tmp_path / "data" / "b")}
    real_scandir, real_listdir = os.scandir, os.listdir

    def check(p):
        if str(p) in denied:
            raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(os, "scandir", lambda p=".": (check(p), real_scandir(p))[1])
    monkeypatch.setattr(os, "listdir", lambda p=".": (check(p), real_listdir(p))[1])
    ds = open_dataset(str(tmp_path / "data"), "all")
    assert ds.class_names == ["a", "b"] and len(ds) == 3 and ds.skipped == 1  # class b kept, its folder counted
    denied.add(str(tmp_path / "data"))
    with pytest.raises(DataError, match=r"data source .*data cannot be read \(Permission denied\)"):
        open_dataset(str(tmp_path / "data"))


def test_folder_transparent_pixels_are_white_whatever_colour_they_hide(tmp_path):
    """RGBA sprites and palette PNGs with a transparent index: the colour under a transparent
    pixel is undefined (here red in one file, green in the other), so both give white."""
    from PIL import Image

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent...
    rgba[2:6, 2:6] = (0, 0, 255, 255)  # ...around an opaque blue square
    (tmp_path / "sprites").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "sprites" / "a.png")
    pal = Image.fromarray(np.where(np.pad(np.ones((4, 4), bool), 2), 1, 0).astype(np.uint8), "P")
    pal.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)  # index 0: green (transparent), 1: blue
    pal.save(tmp_path / "sprites" / "b.png", transparency=0)
    ds = open_dataset(str(tmp_path / "sprites"), "all")
    for i in range(2):
        x = ds[i][0].numpy()
        assert (x[:, 0, 0] == 255).all() and (x[:, 7, 7] == 255).all(), ds.files[i]  # white background
        assert x[:, 4, 4].tolist() == [0, 0, 255]  # the opaque pixels as they are


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((5, 4, 4, 3), "NHWC"),
        ((5, 3, 4, 4), "NCHW"),
        ((5, 3, 3, 1), "NHWC"),
        ((5, 1, 3, 3), "NCHW"),
        ((5, 3, 3, 3), "NCHW"),
    ],
)
def test_npy_small_ambiguous_shapes_read_as_square_images(tmp_path, shape, layout):
    """Both axis 1 and the last could be channels: the reading that gives square images wins;
    when both do (N, 3, 3, 3), NCHW."""
    arr = rand_u8(np.random.default_rng(10), *shape)
    np.save(tmp_path / "a.npy", arr)
    ds = open_dataset(str(tmp_path / "a.npy"), "all")
    nchw = arr.transpose(0, 3, 1, 2) if layout == "NHWC" else arr
    assert torch.equal(all_items(ds)[0], torch.from_numpy(np.ascontiguousarray(nchw)))


# ---------------------------------------------------------------- CIFAR python batches


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_cifar_batches_rewritten_with_numpy_integer_labels(tmp_path, protocol):
    """A batch re-saved with labels as a list of numpy integers (list(np.array(...))) pickles
    them as numpy scalars: read, while every other callable stays refused."""
    import pickle

    rng = np.random.default_rng(11)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rows, labels = rand_u8(rng, 4, 3072), list(np.array([3, 0, 9, 1], np.int64))
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": rows, b"labels": labels}, f, protocol=protocol)
    ds = open_dataset(str(tmp_path))
    assert all_items(ds)[1] == [3, 0, 9, 1]
    assert torch.equal(all_items(ds)[0], torch.from_numpy(rows.reshape(4, 3, 32, 32)))


def test_cifar_scalar_cannot_smuggle_objects(tmp_path):
    """Allowing numpy scalars must not allow scalar(dtype('O'), obj), which hands back obj."""
    from tarflow_core.data import safe_load_pickle

    stream = (
        b"\x80\x02cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nX\x02\x00\x00\x00O8K\x00K\x01\x87R"
        b"X\x03\x00\x00\x00abc\x86R."
    )
    (tmp_path / "data_batch_1").write_bytes(stream)
    with pytest.raises(DataError, match=r"refused to load this pickle \(numpy scalar of dtype\('O'\)"):
        safe_load_pickle(tmp_path / "data_batch_1")


def test_imagenet_batches_are_memory_mapped_not_copied(tmp_path):
    """ImageNet 64 is 15.7 GB of batches: opening it must not read them into memory (nor
    concatenate them, twice that), or every training process would hold its own copy."""
    import tracemalloc

    rng = np.random.default_rng(12)
    parts = [_imagenet_batch(tmp_path / f"train_data_batch_{k}.npz", rng, 400, side=16)[0] for k in (1, 2, 3)]
    np.save(tmp_path.parent / "big.npy", np.concatenate(parts))
    tracemalloc.start()
    try:
        ds = open_dataset(str(tmp_path), "all")
        arr = open_dataset(str(tmp_path.parent / "big.npy"), "all")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 300_000, peak  # the images are 3 x 400 x 768 bytes = 920 kB
    want = np.concatenate(parts)
    for i in (0, 399, 400, 801, 1199):
        assert np.array_equal(ds[i][0].numpy(), want[i]) and np.array_equal(arr[i][0].numpy(), want[i])


def test_folder_imagenet_as_shipped_trains_from_train_and_explains_val(tmp_path):
    """ILSVRC2012 unpacked: train/<wnid>/*.JPEG, but val/*.JPEG flat (labels in a CSV). The
    train split must work; the test split cannot have labels and says what to do."""
    rng = np.random.default_rng(14)
    for wnid in ("n01440764", "n01443537"):
        for k in range(3):
            _png(tmp_path / "train" / wnid / f"{wnid}_{k}.png", rng)
    for k in range(2):
        _png(tmp_path / "val" / f"ILSVRC2012_val_{k:08d}.png", rng)
    train = open_dataset(str(tmp_path), "train")
    assert len(train) == 6 and train.class_names == ["n01440764", "n01443537"]
    with pytest.raises(
        DataError,
        match=r"val/ holds images without class sub-folders but train/ has them.*"
        r"give --data .*train alone",
    ):
        open_dataset(str(tmp_path), "test")


@pytest.mark.parametrize(
    "dtype,hint",
    [
        (np.float32, r"\(x \* 255\).round\(\).astype\(np.uint8\)"),
        (np.int16, r"x.astype\(np.uint8\)"),
        (np.uint16, r"\(x / 257\)"),
    ],
)
def test_npy_not_uint8_says_how_to_convert(tmp_path, dtype, hint):
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8, 3), dtype))
    want = rf"x.npy: expected uint8 images \(0..255\), got dtype {np.dtype(dtype)}; .*{hint}"
    with pytest.raises(DataError, match=want):
        open_dataset(str(tmp_path / "x.npy"))


def test_folder_of_unreadable_files_says_why_for_one(tmp_path):
    (tmp_path / "imgs").mkdir()
    for k in range(2):
        (tmp_path / "imgs" / f"{k}.jpg").write_bytes(b"<html>not found</html>")
    with pytest.raises(
        DataError,
        match=r"none of the 2 image files could be read \(the first, .*0.jpg: "
        r"not an image file Pillow can read\)",
    ):
        open_dataset(str(tmp_path / "imgs"))


def test_folder_train_and_held_out_test_opened_together_read_each_file_once(tmp_path, monkeypatch):
    """A run opens the train split, then the held-out test split, of the same files: checking
    every file twice doubled the start-up reading of a large folder."""
    import tarflow_core.data.folder as folder

    rng = np.random.default_rng(15)
    for k in range(6):
        _png(tmp_path / "imgs" / f"{k}.png", rng)
    probed = []
    real = folder._probe
    monkeypatch.setattr(folder, "_probe", lambda p: (probed.append(p.name), real(p))[1])
    open_dataset(str(tmp_path / "imgs"), "train")
    open_dataset(str(tmp_path / "imgs"), "test")
    assert sorted(probed) == [f"{k}.png" for k in range(6)]
    (tmp_path / "imgs" / "3.png").write_bytes(b"now broken")  # a changed file is checked again
    assert open_dataset(str(tmp_path / "imgs"), "all").skipped == 1


def test_npy_of_one_rgb_image_is_not_read_as_gray_slivers(tmp_path):
    """np.save(one_image) of shape (32, 32, 3) would be 32 grayscale images 32 wide and 3 high."""
    np.save(tmp_path / "one.npy", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"looks like one 32x32 image with 3 channels.*x\[None\]"):
        open_dataset(str(tmp_path / "one.npy"))
    np.save(tmp_path / "gray.npy", np.zeros((5, 12, 10), np.uint8))  # ordinary NHW stays as it was
    assert open_dataset(str(tmp_path / "gray.npy"), "all")[0][0].shape == (1, 10, 10)


def test_cifar_10_and_100_side_by_side_is_ambiguous(tmp_path):
    import pickle

    rng = np.random.default_rng(16)
    c10, c100 = tmp_path / "cifar-10-batches-py", tmp_path / "cifar-100-python"
    c10.mkdir()
    c100.mkdir()
    with open(c10 / "data_batch_1", "wb") as f:
        pickle.dump({b"data": rand_u8(rng, 2, 3072), b"labels": [0, 1]}, f, protocol=2)
    for name in ("train", "meta"):
        with open(c100 / name, "wb") as f:
            pickle.dump({b"data": rand_u8(rng, 2, 3072), b"fine_labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match="holds both cifar-10-batches-py and cifar-100-python; give the one"):
        open_dataset(str(tmp_path))  # it silently took CIFAR-10
    assert open_dataset(str(c100)).num_classes == 100


@pytest.mark.parametrize(
    "folder,name,what",
    [
        ("cifar-10-batches-bin", "data_batch_1.bin", "binary version of CIFAR-10"),
        ("Imagenet32_train", "train_data_batch_1", "pickled version of downsampled"),
    ],
)
def test_versions_not_read_are_named(tmp_path, folder, name, what):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / name).write_bytes(b"\0" * 64)
    for spec in (tmp_path, tmp_path / folder):
        with pytest.raises(DataError, match=f"{name} is the {what}.*which is not read; use"):
            open_dataset(str(spec))


def test_folder_float_tiff_in_unit_range_is_scaled(tmp_path):
    """A float TIFF (mode F) with values in [0, 1] (scientific images) was rounded to 0/1: black."""
    from PIL import Image

    (tmp_path / "tifs").mkdir()
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp, "F").save(tmp_path / "tifs" / "a.tif")
    Image.fromarray(ramp * 255, "F").save(tmp_path / "tifs" / "b.tif")  # 0..255 floats stay as they are
    ds = open_dataset(str(tmp_path / "tifs"), "all")
    want = np.floor(ramp.astype(np.float64) * 255 + 0.5).astype(np.uint8)
    assert ds.channels == 1
    assert np.array_equal(ds[0][0].numpy()[0], want) and np.array_equal(ds[1][0].numpy()[0], want)


def test_folder_phone_formats_pillow_cannot_read_are_counted_not_ignored(tmp_path):
    """An iPhone folder: JPEGs and HEICs. The HEICs (no decoder) must show in the skip count."""
    rng = np.random.default_rng(18)
    for k in range(3):
        _png(tmp_path / "phone" / f"IMG_{k}.png", rng)
    (tmp_path / "phone" / "IMG_9.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(100))
    ds = open_dataset(str(tmp_path / "phone"), "all")
    assert len(ds) == 3 and ds.skipped == 1
