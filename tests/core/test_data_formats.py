"""Data sources laid out the way the public data sets ship them (files written here, tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tarflow_core.data import DataError, detect_kind, open_dataset

from .test_data import all_items, rand_u8, write_idx


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
