"""Datasets (IDX Fashion-MNIST, CIFAR python batches) and batching/augmentation on tensors."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import compress.data
from compress.config import AugmentSpec, DataSpec
from compress.data import (FASHION_CLASSES, Split, augment_batch, fashion_mnist, iterate, load_data,
                           normalize, num_batches, write_cifar_like)
from compress.errors import CompressError


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No $COMPRESS_DATA and no Debian copy unless a test puts them there."""
    monkeypatch.delenv("COMPRESS_DATA", raising=False)
    monkeypatch.setattr(compress.data, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))


def assert_loaded(data, arrays):
    assert data.train.x.dtype == torch.uint8 and data.train.y.dtype == torch.int64
    assert data.train.x.shape == (len(arrays["train_x"]), 1, 28, 28)
    assert data.test.x.shape == (len(arrays["test_x"]), 1, 28, 28)
    np.testing.assert_array_equal(data.train.x[:, 0].numpy(), arrays["train_x"])
    np.testing.assert_array_equal(data.train.y.numpy(), arrays["train_y"])
    np.testing.assert_array_equal(data.test.x[:, 0].numpy(), arrays["test_x"])
    np.testing.assert_array_equal(data.test.y.numpy(), arrays["test_y"])


# ---- Fashion-MNIST (IDX) ---------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_fmnist_loads_exact_arrays(tmp_path, fmnist_writer, gz):
    arrays = fmnist_writer(tmp_path / "d", n_train=40, n_test=20, gz=gz)
    data = fashion_mnist(root=str(tmp_path / "d"), download=False)
    assert_loaded(data, arrays)
    assert data.classes == FASHION_CLASSES and data.num_classes == 10
    assert data.input_shape == (1, 28, 28)
    assert data.source == str(tmp_path / "d")
    # mean/std over all training pixels in [0, 1], rounded to 4 places
    pixels = arrays["train_x"].astype(np.float64) / 255
    assert data.mean == pytest.approx([pixels.mean()], abs=1e-4)
    assert data.std == pytest.approx([pixels.std(ddof=1)], abs=1e-4)


def test_fmnist_header_written_by_hand(tmp_path):
    # independent of the fixture's writer: bytes laid out per the IDX spec
    img = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    images = b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + img.tobytes()
    labels = b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + bytes([7, 3])
    for prefix in ("train", "t10k"):
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(images)
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)
    data = fashion_mnist(root=str(tmp_path), download=False)
    np.testing.assert_array_equal(data.train.x[:, 0].numpy(), img)
    assert data.train.y.tolist() == [7, 3]


def test_fmnist_torchvision_layout(tmp_path, fmnist_writer):
    arrays = fmnist_writer(tmp_path / "FashionMNIST" / "raw", n_train=20, n_test=10)
    data = fashion_mnist(root=str(tmp_path), download=False)
    assert_loaded(data, arrays)
    assert Path(data.source) == tmp_path / "FashionMNIST" / "raw"


def _stem(key):
    return {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
            "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}[key]


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("key", ["train_x", "test_y"])
def test_fmnist_truncated(tmp_path, fmnist_writer, gz, key):
    fmnist_writer(tmp_path, n_train=20, n_test=10, gz=gz)
    path = tmp_path / (_stem(key) + (".gz" if gz else ""))
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    cut = raw[:-5]
    path.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(CompressError, match="truncated") as e:
        fashion_mnist(root=str(tmp_path), download=False)
    assert str(path) in str(e.value) and f"({len(cut)} of {len(raw)} bytes)" in str(e.value)


def test_fmnist_cut_gzip_stream(tmp_path, fmnist_writer):
    fmnist_writer(tmp_path, n_train=20, n_test=10)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(CompressError, match="cannot read IDX file") as e:
        fashion_mnist(root=str(tmp_path), download=False)
    assert str(path) in str(e.value)


def test_fmnist_wrong_kind_of_idx(tmp_path, fmnist_writer):
    fmnist_writer(tmp_path, n_train=20, n_test=10)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(labels.read_bytes())
    with pytest.raises(CompressError, match="not an IDX uint8 file with 3 dimensions"):
        fashion_mnist(root=str(tmp_path), download=False)


def test_fmnist_count_mismatch(tmp_path, fmnist_writer):
    fmnist_writer(tmp_path, n_train=20, n_test=10)
    fmnist_writer(tmp_path / "other", n_train=21, n_test=10)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        (tmp_path / "other" / "train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(CompressError, match="image and label counts differ"):
        fashion_mnist(root=str(tmp_path), download=False)


def test_fmnist_search_order(tmp_path, fmnist_writer, monkeypatch):
    fmnist_writer(tmp_path / "root", n_train=11, n_test=5)
    fmnist_writer(tmp_path / "env", n_train=12, n_test=5)
    fmnist_writer(tmp_path / "debian", n_train=13, n_test=5)
    monkeypatch.setattr(compress.data, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    assert len(fashion_mnist(download=False).train) == 13
    monkeypatch.setenv("COMPRESS_DATA", str(tmp_path / "env"))
    assert len(fashion_mnist(download=False).train) == 12
    assert len(fashion_mnist(root=str(tmp_path / "root"), download=False).train) == 11
    # an explicit root is the only place looked: one with only some of the files is an
    # error naming what it lacks, never silently replaced by another copy
    (tmp_path / "root" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(CompressError, match="data.root .*root \\(lacks t10k-labels-idx1-ubyte\\)"):
        fashion_mnist(root=str(tmp_path / "root"), download=False)


def test_fmnist_missing_everywhere_lists_tried(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("COMPRESS_DATA", str(tmp_path / "env-empty"))
    with pytest.raises(CompressError) as e:
        fashion_mnist(download=False)
    msg = str(e.value)
    assert msg.startswith("fashion_mnist: dataset not found; tried ")
    tried = msg.removeprefix("fashion_mnist: dataset not found; tried ").split(". ")[0].split("; ")
    assert tried == [f"$COMPRESS_DATA {tmp_path / 'env-empty'} (no such folder)",
                     f"Debian dataset-fashion-mnist {tmp_path / 'no-debian'} (no such folder)",
                     "no download (data.download: false)"]


def test_load_data_subsets(tmp_path, fmnist_writer):
    arrays = fmnist_writer(tmp_path, n_train=30, n_test=20)
    data = load_data(DataSpec(root=str(tmp_path), download=False, train_subset=7, test_subset=5))
    assert len(data.train) == 7 and len(data.test) == 5
    np.testing.assert_array_equal(data.train.x[:, 0].numpy(), arrays["train_x"][:7])
    np.testing.assert_array_equal(data.test.y.numpy(), arrays["test_y"][:5])


def test_load_data_unknown_dataset():
    with pytest.raises(CompressError, match=r"^data\.name: unknown dataset 'mnist'"):
        load_data(DataSpec(name="mnist"))


# ---- CIFAR (python batches) ---------------------------------------------------------------------

@pytest.mark.parametrize("name,folder,ncls", [("cifar10", "cifar-10-batches-py", 10),
                                              ("cifar100", "cifar-100-python", 100)])
def test_cifar_like(tmp_path, name, folder, ncls):
    base = write_cifar_like(tmp_path, name, n_train=50, n_test=20)
    assert base == tmp_path / folder
    data = load_data(DataSpec(name=name, root=str(tmp_path)))
    assert data.train.x.shape == (50, 3, 32, 32) and data.test.x.shape == (20, 3, 32, 32)
    assert data.train.x.dtype == torch.uint8 and data.train.y.dtype == torch.int64
    for split in (data.train, data.test):
        assert 0 <= int(split.y.min()) and int(split.y.max()) < ncls
    assert data.classes == [f"class{i}" for i in range(ncls)]
    assert data.num_classes == ncls and data.input_shape == (3, 32, 32)
    assert len(data.mean) == len(data.std) == 3
    # rows of 3072 bytes are channel-major 32x32 planes (R, G, B)
    first = "data_batch_1" if name == "cifar10" else "train"
    with open(base / first, "rb") as f:
        raw = pickle.load(f)
    np.testing.assert_array_equal(data.train.x[0].numpy().reshape(-1), raw[b"data"][0])
    np.testing.assert_array_equal(data.train.x[0, 1].numpy().reshape(-1), raw[b"data"][0][1024:2048])


def test_cifar_root_from_env(tmp_path, monkeypatch):
    write_cifar_like(tmp_path, "cifar10", n_train=10, n_test=5)
    monkeypatch.setenv("COMPRESS_DATA", str(tmp_path))
    assert len(load_data(DataSpec(name="cifar10")).train) == 10


def test_cifar_without_root():
    with pytest.raises(CompressError, match=r"cifar10: set data\.root"):
        load_data(DataSpec(name="cifar10"))


def test_cifar_missing_batch(tmp_path):
    base = write_cifar_like(tmp_path, "cifar10", n_train=10, n_test=5)
    (base / "data_batch_3").unlink()
    with pytest.raises(CompressError) as e:
        load_data(DataSpec(name="cifar10", root=str(tmp_path), download=False))
    assert str(e.value) == f"cifar10: {base} lacks data_batch_3 (set data.download: true to fetch it)"


def test_cifar_bad_shape(tmp_path):
    base = write_cifar_like(tmp_path, "cifar10", n_train=10, n_test=5)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((5, 100), np.uint8), b"labels": [0] * 5}, f)
    with pytest.raises(CompressError, match=r"expected data of shape \[N, 3072\], got \[5, 100\]"):
        load_data(DataSpec(name="cifar10", root=str(tmp_path)))


class _Gadget:
    """Unpickling this calls `func(*args)`: what a malicious 'CIFAR batch' would do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("gadget", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("victim", ["data_batch_1", "batches.meta"])
def test_cifar_refuses_code_in_pickle(tmp_path, gadget, victim):
    base = write_cifar_like(tmp_path, "cifar10", n_train=10, n_test=5)
    marker = tmp_path / "pwned"
    if gadget == "os.system":
        payload = _Gadget(os.system, f"touch {marker}")
    else:
        payload = _Gadget(exec, f"open({str(marker)!r}, 'w').close()")
    with open(base / victim, "wb") as f:
        pickle.dump({b"data": payload, b"labels": [0], b"label_names": payload}, f)
    with pytest.raises(CompressError) as e:
        load_data(DataSpec(name="cifar10", root=str(tmp_path)))
    assert "refusing to load" in str(e.value) and str(base / victim) in str(e.value)
    assert ("system" if gadget == "os.system" else "exec") in str(e.value)
    assert not marker.exists()


def test_cifar_pickle_protocol_5(tmp_path):
    base = write_cifar_like(tmp_path, "cifar10", n_train=10, n_test=5)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((5, 3072), np.uint8), b"labels": [1] * 5}, f, protocol=5)
    assert load_data(DataSpec(name="cifar10", root=str(tmp_path))).test.y.tolist() == [1] * 5


# ---- batching and augmentation --------------------------------------------------------------

def tiny_data(n=37, c=1, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 10
    split = Split(x, y)
    mean, std = compress.data._stats(x)
    return compress.data.Data("tiny", [str(i) for i in range(10)], split, split, mean, std)


@pytest.mark.parametrize("batch_size,drop_last", [(8, False), (8, True), (37, False), (100, True)])
def test_iterate_covers_every_index_once(batch_size, drop_last):
    data = tiny_data()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # two epochs, each a fresh permutation
        batches = list(iterate(data.train, data, batch_size, shuffle=True, generator=g, drop_last=drop_last))
        assert len(batches) == num_batches(37, batch_size, drop_last)
        idx = torch.cat([b.index for b in batches])
        expected = 37 - 37 % batch_size if (drop_last and batch_size <= 37) else 37
        assert len(idx) == expected and len(set(idx.tolist())) == expected
        if not drop_last:
            assert sorted(idx.tolist()) == list(range(37))
        for b in batches:
            assert torch.equal(b.y, data.train.y[b.index])
            assert torch.allclose(b.x, normalize(data.train.x[b.index], data.mean, data.std))
    if batch_size < 37:
        assert idx.tolist() != sorted(idx.tolist())  # actually shuffled


def test_iterate_unshuffled_is_in_order():
    data = tiny_data()
    idx = torch.cat([b.index for b in iterate(data.test, data, 10)])
    assert idx.tolist() == list(range(37))


def test_normalized_batches_are_standardised():
    data = tiny_data(n=200)
    x = next(iterate(data.train, data, 200)).x
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3


def test_same_seed_same_batches():
    data = tiny_data()
    aug = AugmentSpec(crop=2, flip=True)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return list(iterate(data.train, data, 8, shuffle=True, augment=aug, generator=g))

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(p.x, q.x) and torch.equal(p.index, q.index) for p, q in zip(a, b))
    assert any(not torch.equal(p.index, q.index) for p, q in zip(a, c))


def test_flip_is_identity_or_mirror():
    x = torch.rand(64, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    out, flipped = augment_batch(x, crop=0, flip=True, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(s != m for s, m in zip(same, mirrored))  # exactly one of the two, per image
    assert 0 < sum(mirrored) < 64
    assert flipped.tolist() == mirrored  # the mask reports which images were mirrored


def _shifted(img, sy, sx):
    """img moved by (sy, sx) pixels, zero-filled: out[y, x] = img[y + sy, x + sx]."""
    h, w = img.shape[-2:]
    out = torch.zeros_like(img)
    ys, yd = slice(max(sy, 0), h + min(sy, 0)), slice(max(-sy, 0), h + min(-sy, 0))
    xs, xd = slice(max(sx, 0), w + min(sx, 0)), slice(max(-sx, 0), w + min(-sx, 0))
    out[..., yd, xd] = img[..., ys, xs]
    return out


@pytest.mark.parametrize("pad", [1, 3])
def test_crop_shifts_by_at_most_padding(pad):
    n, c, h, w = 48, 2, 7, 9
    # distinct non-zero values: zero can only be padding, and any shift is identifiable
    x = (torch.arange(n * c * h * w, dtype=torch.float32) + 1).view(n, c, h, w)
    out, flipped = augment_batch(x, crop=pad, flip=False, generator=torch.Generator().manual_seed(0))
    assert not flipped.any()
    assert out.shape == x.shape
    shifts = []
    for o, i in zip(out, x):
        found = [(sy, sx) for sy in range(-pad, pad + 1) for sx in range(-pad, pad + 1)
                 if torch.equal(o, _shifted(i, sy, sx))]
        assert len(found) == 1, "output is not the input shifted by at most `pad` pixels"
        shifts.append(found[0])
    assert len(set(shifts)) > 1 and {s for sh in shifts for s in sh} <= set(range(-pad, pad + 1))


def test_iterate_augment_changes_only_training_batches():
    data = tiny_data()
    plain = next(iterate(data.train, data, 37)).x
    same = next(iterate(data.train, data, 37, augment=AugmentSpec())).x
    aug = next(iterate(data.train, data, 37, augment=AugmentSpec(flip=True),
                       generator=torch.Generator().manual_seed(0))).x
    assert torch.equal(plain, same)
    assert not torch.equal(plain, aug)


def test_batch_view_marks_flipped_images():
    data = tiny_data()
    gen = torch.Generator().manual_seed(0)
    aug = AugmentSpec(flip=True)
    for b in iterate(data.train, data, 16, augment=aug, generator=gen):
        plain = next(iterate(Split(data.train.x[b.index], data.train.y[b.index]), data, len(b.index))).x
        for x, p, v in zip(b.x, plain, b.view):
            assert torch.equal(x, p.flip(-1) if v else p)
    mirrored = next(iterate(data.train, data, 8, flip_all=True))
    assert mirrored.view.tolist() == [1] * 8
    assert AugmentSpec().views == 1 and aug.views == 2 and AugmentSpec(crop=2).views is None
