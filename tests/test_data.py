import gzip

import numpy as np
import pytest
import torch

from etappe.data import ResumableBatches, load_dataset, read_idx, write_idx
from etappe.errors import DataError, UsageError
from tests.conftest import FASHION, needs_fashion


def test_idx_round_trip_plain_and_gzipped(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    for name, array in [("a-idx3-ubyte", images), ("b-idx1-ubyte.gz", labels)]:
        write_idx(tmp_path / name, array)
        back = read_idx(tmp_path / name)
        assert back.dtype == array.dtype and np.array_equal(back, array)
    write_idx(tmp_path / "f.gz", np.array([[1.5, -2.0]], dtype=np.float32))
    assert np.array_equal(read_idx(tmp_path / "f.gz"), np.array([[1.5, -2.0]], dtype=np.float32))


def test_idx_bad_magic_names_what_was_found(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00\x00\x00\x01" + b"\x05")
    with pytest.raises(DataError, match=r"bad IDX magic number 0x12340801"):
        read_idx(path)


def test_idx_size_mismatch_quotes_both_sizes(tmp_path):
    path = tmp_path / "short.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"\x01\x02\x03")
    with pytest.raises(DataError, match=r"declares shape \(10,\).*18 bytes.*holds 11 bytes"):
        read_idx(path)


def test_idx_folder_loads_as_a_data_set(tmp_path):
    rng = np.random.default_rng(0)
    for stem, array in {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 6, 6), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 3, 20, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 6, 6), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([0, 1, 2, 1, 0], dtype=np.uint8),
    }.items():
        write_idx(tmp_path / f"{stem}.gz", array)
    data = load_dataset(f"idx:{tmp_path}")
    assert data.spec.input_shape == (1, 6, 6) and data.spec.num_classes == 3
    x, y = data.test.batch(torch.arange(5))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y.tolist() == [0, 1, 2, 1, 0]


def test_idx_folder_missing_files_says_which(tmp_path):
    with pytest.raises(DataError, match="missing IDX files .*t10k-labels-idx1-ubyte"):
        load_dataset(f"idx:{tmp_path}")


def test_missing_named_set_offline_says_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DataError, match=r"put its four IDX files into .*etappe/mnist"):
        load_dataset("mnist", data_dir=tmp_path / "none", allow_download=False)


def test_unknown_data_set_names_choices():
    with pytest.raises(UsageError, match="choose one of: digits, mnist, fashion-mnist, linear, sine"):
        load_dataset("cifar")


def test_digits_split_is_fixed_and_disjoint():
    a, b = load_dataset("digits"), load_dataset("digits", seed=5)
    assert len(a.train) == 1437 and len(a.test) == 360
    assert torch.equal(a.test.x, b.test.x) and a.train.x.dtype == torch.uint8
    train_rows = {tuple(r.flatten().tolist()) for r in a.train.x}
    overlap = sum(tuple(r.flatten().tolist()) in train_rows for r in a.test.x)
    assert overlap < 5  # a few digits in the set are exact duplicates of each other


def test_synthetic_sets_are_seeded():
    assert torch.equal(load_dataset("linear", seed=1).train.x, load_dataset("linear", seed=1).train.x)
    assert not torch.equal(load_dataset("linear", seed=1).train.x, load_dataset("linear", seed=2).train.x)
    sine = load_dataset("sine")
    assert sine.train.x.min() >= -2 and sine.train.x.max() <= 2
    assert torch.allclose(sine.train.y, torch.sin(sine.train.x))


@needs_fashion
def test_fashion_mnist_from_debian_package():
    data = load_dataset("fashion-mnist")
    assert len(data.train) == 60000 and len(data.test) == 10000 and data.spec.input_shape == (1, 28, 28)
    assert data.train.x.dtype == torch.uint8 and data.spec.num_classes == 10


def test_batches_cover_the_epoch_once_and_resume_mid_epoch():
    b = ResumableBatches(103, 10, seed=3)
    full = list(b.batches(4))
    assert len(full) == len(b) == 11
    assert sorted(torch.cat(full).tolist()) == list(range(103))
    resumed = list(b.batches(4, start=6))
    assert all(torch.equal(x, y) for x, y in zip(full[6:], resumed)) and len(resumed) == 5
    assert not torch.equal(torch.cat(list(b.batches(5))), torch.cat(full))  # a new order each epoch


def test_ranks_take_disjoint_slices_of_each_global_batch():
    ranks = [ResumableBatches(50, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 7
    single = list(ResumableBatches(50, 8, seed=1).batches(0))
    for k, (a, b) in enumerate(zip(ranks[0].batches(0), ranks[1].batches(0))):
        assert set(a.tolist()).isdisjoint(b.tolist()) and abs(len(a) - len(b)) <= 1
        assert torch.equal(torch.cat([a, b]), single[k])
