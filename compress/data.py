"""Datasets held in memory as one uint8 tensor (on the training device) and batched by
index: no DataLoader workers on the hot path. Augmentation runs on batched tensors.
"""

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CompressError
from .registry import Registry

DATASETS = Registry("dataset")

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


@dataclass
class Split:
    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # int64 [N]

    def __len__(self):
        return len(self.y)

    def to(self, device):
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Data:
    name: str
    classes: list
    train: Split
    test: Split
    mean: list
    std: list
    source: str = ""

    @property
    def input_shape(self):
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self):
        return len(self.classes)

    def to(self, device):
        return Data(self.name, self.classes, self.train.to(device), self.test.to(device),
                    self.mean, self.std, self.source)


@dataclass
class Batch:
    """One batch, the same shape for every method: images, labels, dataset indices, and
    the view of each image (0: as stored, 1: horizontally flipped) so that outputs cached
    per (view, index) can be looked up. `weight`: each image's loss weight (data pruning), or
    None for all 1."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    view: torch.Tensor = None
    weight: torch.Tensor = None


# ---- preprocessing on batched tensors ---------------------------------------------------

def normalize(x_uint8, mean, std):
    """uint8 NCHW -> float, scaled to [0, 1], then standardised per channel."""
    x = x_uint8.float().div_(255)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def augment_batch(x, crop, flip, generator):
    """Random crop with zero padding (black, before normalisation) and horizontal flip,
    drawn per image on the batch's device. Returns (images, flipped mask)."""
    n, _, h, w = x.shape
    dev = x.device
    mask = torch.zeros(n, dtype=torch.bool, device=dev)
    if flip:
        mask = torch.rand(n, device=dev, generator=generator) < 0.5
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
    if crop:
        padded = F.pad(x, (crop, crop, crop, crop))
        dy = torch.randint(0, 2 * crop + 1, (n,), device=dev, generator=generator)
        dx = torch.randint(0, 2 * crop + 1, (n,), device=dev, generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w)
        c = x.shape[1]
        x = padded.gather(2, rows.expand(n, c, h, w + 2 * crop)).gather(3, cols.expand(n, c, h, w))
    return x, mask


def iterate(split, data, batch_size, *, shuffle=False, augment=None, generator=None,
            channels_last=False, drop_last=False, flip_all=False, shard=(0, 1), size=None,
            indices=None, weights=None):
    """Yield :class:`Batch` es of normalised (and optionally augmented) images by index.
    `flip_all` yields every image mirrored (view 1), e.g. to cache a teacher's outputs.
    `size`: images resized to size x size (antialiased bilinear, after augmentation), e.g. a
    progressive-resizing epoch; None: as stored.
    `shard` = (rank, world): yield only rows rank::world of each batch (one process's part of
    a global batch under torchrun; the same images and augmentation as in one process).
    `indices`: only these images of the split (e.g. those a data-pruning epoch keeps), in
    shuffled order if `shuffle`; `weights`: a per-image loss weight over the whole split,
    passed on in each batch's `weight`."""
    dev = split.x.device
    n = len(split) if indices is None else len(indices)
    order = torch.randperm(n, device=dev, generator=generator) if shuffle else torch.arange(n, device=dev)
    if indices is not None:
        order = indices.to(dev)[order]
    stop = n - n % batch_size if (drop_last and n >= batch_size) else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        x = split.x[idx].float().div_(255)
        view = torch.full((len(idx),), int(flip_all), dtype=torch.long, device=dev)
        if flip_all:
            x = x.flip(3)
        elif augment is not None and not augment.deterministic:
            x, flipped = augment_batch(x, augment.crop, augment.flip, generator)
            view = flipped.long()
        if size is not None and tuple(x.shape[2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        m = torch.tensor(data.mean, device=dev).view(1, -1, 1, 1)
        s = torch.tensor(data.std, device=dev).view(1, -1, 1, 1)
        x = (x - m) / s
        if shard[1] > 1:
            r, w = shard
            x, idx, view = x[r::w], idx[r::w], view[r::w]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield Batch(x, split.y[idx], idx, view, None if weights is None else weights[idx])


def num_batches(n, batch_size, drop_last=False):
    return n // batch_size if (drop_last and n >= batch_size) else -(-n // batch_size)


# ---- loading ---------------------------------------------------------------------------------

def _stats(x):
    xf = x.float().div_(255)
    dims = (0, 2, 3)
    return [round(v, 4) for v in xf.mean(dims).tolist()], [round(v, 4) for v in xf.std(dims).tolist()]


def _read_idx(path, expect_dims):
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged gzip stream
        raise CompressError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[2] != 8 or raw[3] != expect_dims:
        raise CompressError(f"{path}: not an IDX uint8 file with {expect_dims} dimensions")
    dims = np.frombuffer(raw, ">u4", count=expect_dims, offset=4).astype(int)
    need = 4 + 4 * expect_dims + int(np.prod(dims))
    if len(raw) < need:
        raise CompressError(f"{path}: truncated ({len(raw)} of {need} bytes)")
    return np.frombuffer(raw, np.uint8, count=int(np.prod(dims)), offset=4 + 4 * expect_dims).reshape(dims)


_FMNIST_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
                 "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


def _find_idx_files(root):
    """{key: path} when `root` (or root/FashionMNIST/raw) holds all four IDX files, else None."""
    for d in (Path(root), Path(root) / "FashionMNIST" / "raw"):
        found = {}
        for key, stem in _FMNIST_FILES.items():
            for cand in (d / stem, d / (stem + ".gz")):
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == 4:
            return found
    return None


def _what_lacks(root):
    """' (no such folder)', ' (lacks FILE, ...)' for a partial copy, or ''."""
    if not Path(root).is_dir():
        return " (no such folder)"
    for d in (Path(root), Path(root) / "FashionMNIST" / "raw"):
        lacks = [s for s in _FMNIST_FILES.values() if not ((d / s).is_file() or (d / f"{s}.gz").is_file())]
        if len(lacks) < len(_FMNIST_FILES):
            return f" (lacks {', '.join(lacks)})"
    return ""


def _check_labels(name, source, splits, num_classes):
    """Labels outside 0..num_classes-1 would fail deep inside the loss: refuse them here."""
    for split, s in zip(("train", "test"), splits):
        if len(s.y) and (int(s.y.min()) < 0 or int(s.y.max()) >= num_classes):
            raise CompressError(f"{name} at {source}: {split} labels must be in 0..{num_classes - 1}, "
                                f"found {int(s.y.min())}..{int(s.y.max())}")


@DATASETS.register("fashion_mnist")
def fashion_mnist(root=None, download=None):
    """Fashion-MNIST (Xiao et al. 2017), 28x28 grey, 10 classes. An explicit `root` is the
    only place looked (then downloaded into with `download: true`); without one: $COMPRESS_DATA,
    then Debian's dataset-fashion-mnist, then a torchvision download."""
    if root is not None:
        files = _find_idx_files(root)
        if files is None and download:
            try:
                import torchvision

                torchvision.datasets.FashionMNIST(root, train=True, download=True)
                torchvision.datasets.FashionMNIST(root, train=False, download=True)
            except Exception as e:  # noqa: BLE001 - any download failure becomes one line
                raise CompressError(f"fashion_mnist: download to data.root {root} failed "
                                    f"({type(e).__name__})") from None
            files = _find_idx_files(root)
        if files is None:
            raise CompressError(f"fashion_mnist: data.root {root}{_what_lacks(root) or ' (lacks the four IDX files)'}; "
                                "an explicit root is the only place looked (set data.download: true to "
                                "fetch the files there)")
        arrays = {k: _read_idx(p, 3 if k.endswith("x") else 1) for k, p in files.items()}
        return _fmnist_from_arrays(arrays, str(Path(files["train_x"]).parent))
    tried = []
    candidates = [("$COMPRESS_DATA", os.environ.get("COMPRESS_DATA")),
                  ("Debian dataset-fashion-mnist", DEBIAN_FASHION_MNIST)]
    for label, d in candidates:
        if not d:
            continue
        files = _find_idx_files(d)
        if files:
            arrays = {k: _read_idx(p, 3 if k.endswith("x") else 1) for k, p in files.items()}
            return _fmnist_from_arrays(arrays, str(Path(files["train_x"]).parent))
        tried.append(f"{label} {d}{_what_lacks(d)}")
    if download is not False:
        target = os.environ.get("COMPRESS_DATA") or str(Path.home() / ".cache" / "compress")
        try:
            import torchvision

            torchvision.datasets.FashionMNIST(target, train=True, download=True)
            torchvision.datasets.FashionMNIST(target, train=False, download=True)
            files = _find_idx_files(target)
            if files:
                arrays = {k: _read_idx(p, 3 if k.endswith("x") else 1) for k, p in files.items()}
                return _fmnist_from_arrays(arrays, target)
        except Exception as e:  # noqa: BLE001 - any download failure becomes one line
            tried.append(f"torchvision download to {target} ({type(e).__name__})")
    else:
        tried.append("no download (data.download: false)")
    raise CompressError("fashion_mnist: dataset not found; tried " + "; ".join(tried) +
                        ". Install Debian's dataset-fashion-mnist, or set data.root or $COMPRESS_DATA "
                        "to a folder with the four IDX files")


def _fmnist_from_arrays(a, source):
    train = Split(torch.from_numpy(a["train_x"].copy()).unsqueeze(1), torch.from_numpy(a["train_y"].astype(np.int64)))
    test = Split(torch.from_numpy(a["test_x"].copy()).unsqueeze(1), torch.from_numpy(a["test_y"].astype(np.int64)))
    if len(train.x) != len(train.y) or len(test.x) != len(test.y):
        raise CompressError(f"fashion_mnist at {source}: image and label counts differ")
    _check_labels("fashion_mnist", source, (train, test), len(FASHION_CLASSES))
    mean, std = _stats(train.x)
    return Data("fashion_mnist", list(FASHION_CLASSES), train, test, mean, std, source)


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles; allow only the numpy types they contain."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path):
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise CompressError(f"{path}: cannot read CIFAR batch ({e})") from None
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    return d


def _cifar(name, folder, train_files, test_files, meta_file, label_key, names_key, root, download):
    if root is None:
        root = os.environ.get("COMPRESS_DATA")
    if root is None:
        raise CompressError(f"{name}: set data.root (or $COMPRESS_DATA) to a folder holding {folder}/"
                            " (data.download: true fetches it there)")
    base = Path(root) / folder
    if not base.is_dir() and download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(root, train=True, download=True)
        except Exception as e:  # noqa: BLE001
            raise CompressError(f"{name}: download to {root} failed ({type(e).__name__}: {e})") from None
    missing = [f for f in [*train_files, *test_files, meta_file] if not (base / f).is_file()]
    if missing:
        hint = "" if download else " (set data.download: true to fetch it)"
        raise CompressError(f"{name}: {base} lacks {', '.join(missing)}{hint}")

    def load(files):
        xs, ys = [], []
        for f in files:
            d = _read_cifar_batch(base / f)
            x = np.asarray(d["data"], dtype=np.uint8)
            if x.ndim != 2 or x.shape[1] != 3072:
                raise CompressError(f"{base / f}: expected data of shape [N, 3072], got {list(x.shape)}")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))

    meta = _read_cifar_batch(base / meta_file)
    classes = [c.decode() if isinstance(c, bytes) else c for c in meta[names_key]]
    train, test = load(train_files), load(test_files)
    _check_labels(name, base, (train, test), len(classes))
    mean, std = _stats(train.x)
    return Data(name, classes, train, test, mean, std, str(base))


@DATASETS.register("cifar10")
def cifar10(root=None, download=None):
    """CIFAR-10 (Krizhevsky 2009), 32x32 RGB, 10 classes, from torchvision's python batches."""
    return _cifar("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                  ["test_batch"], "batches.meta", "labels", "label_names", root, bool(download))


@DATASETS.register("cifar100")
def cifar100(root=None, download=None):
    """CIFAR-100 (Krizhevsky 2009), 32x32 RGB, 100 fine classes."""
    return _cifar("cifar100", "cifar-100-python", ["train"], ["test"], "meta", "fine_labels",
                  "fine_label_names", root, bool(download))


def load_data(spec):
    """Load the dataset a recipe's `data` section names, trimmed to its subsets."""
    data = DATASETS.get_or_fail(spec.name, "data.name")(root=spec.root, download=spec.download)
    if spec.train_subset:
        data.train = Split(data.train.x[:spec.train_subset], data.train.y[:spec.train_subset])
    if spec.test_subset:
        data.test = Split(data.test.x[:spec.test_subset], data.test.y[:spec.test_subset])
    return data


def write_cifar_like(root, name="cifar10", n_train=100, n_test=50, seed=0):
    """Write small random files in CIFAR's own python-batch format (for tests and smoke runs)."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        base, ncls = Path(root) / "cifar-10-batches-py", 10
        files = {f"data_batch_{i}": n_train // 5 for i in range(1, 6)} | {"test_batch": n_test}
        meta = ("batches.meta", {b"label_names": [f"class{i}".encode() for i in range(ncls)]})
        key = b"labels"
    else:
        base, ncls = Path(root) / "cifar-100-python", 100
        files = {"train": n_train, "test": n_test}
        meta = ("meta", {b"fine_label_names": [f"class{i}".encode() for i in range(ncls)]})
        key = b"fine_labels"
    base.mkdir(parents=True, exist_ok=True)
    for f, n in files.items():
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             key: rng.integers(0, ncls, n).tolist()}
        with open(base / f, "wb") as fh:
            pickle.dump(d, fh)
    with open(base / meta[0], "wb") as fh:
        pickle.dump(meta[1], fh)
    return base
