"""Shared fixtures: a tiny Fashion-MNIST in IDX format and a small valid recipe."""

import copy
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FMNIST_STEMS = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
                "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


HEAVY_MODULES = ("torch", "torchvision", "timm", "torch_pruning")


def run_without_heavy_imports(code):
    """Run the Python statements `code` in a fresh interpreter from the repository root;
    returns (their stdout, the torch / torchvision / timm / torch-pruning modules they
    imported, at most 5). Fails with stderr if they fail."""
    check = f"import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_MODULES!r})[:5])"
    r = subprocess.run([sys.executable, "-c", f"{code}\n{check}"], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    *out, heavy = r.stdout.splitlines()
    return "\n".join(out), heavy


def idx_bytes(array):
    """IDX encoding of a uint8 array: magic 0x0000080N (N = ndim), big-endian dims, data."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(">I", 0x800 | a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_fmnist(root, n_train=64, n_test=32, gz=True, seed=0):
    """Write the four Fashion-MNIST IDX files (random images, labels 0..9) under `root`;
    returns the arrays written, keyed like FMNIST_STEMS."""
    rng = np.random.default_rng(seed)
    arrays = {"train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_y": (np.arange(n_train) % 10).astype(np.uint8),
              "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_y": (np.arange(n_test) % 10).astype(np.uint8)}
    root.mkdir(parents=True, exist_ok=True)
    for key, stem in FMNIST_STEMS.items():
        raw = idx_bytes(arrays[key])
        if gz:
            (root / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (root / stem).write_bytes(raw)
    return arrays


def pytest_configure(config):
    """Under pytest-xdist (pyproject's `-n 2`) two workers share the machine: each computes on
    one thread, in-process and in the commands it starts (OMP_NUM_THREADS), so the two do not
    oversubscribe a 2-core machine and a run in a subprocess reduces its sums in the same order
    as one in-process (tests compare their files byte for byte)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _pt2e_prepared_per_test():
    """Each test prepares pt2e graphs as a process of its own would: a preparation cached by
    an earlier test (perhaps under its monkeypatches) is never reused."""
    from compress.quant import pt2e

    pt2e._PREPARED.clear()


@pytest.fixture
def fmnist_writer():
    """`write_fmnist(root, n_train=64, n_test=32, gz=True, seed=0) -> arrays`."""
    return write_fmnist


@pytest.fixture
def fmnist_root(tmp_path):
    """A folder holding a 64/32-image Fashion-MNIST (gzipped IDX files)."""
    root = tmp_path / "fmnist"
    write_fmnist(root)
    return root


TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "data": {"name": "fashion_mnist", "download": False},
    "models": {"teacher": {"arch": "vgg_small", "args": {"cfg": [8, "M", 16]}}},
    "stages": [
        {"name": "teacher", "kind": "train", "model": "teacher", "epochs": 1, "batch_size": 32},
        {"name": "prune", "kind": "prune", "from": "teacher", "ratio": 0.5},
        {"name": "distill", "kind": "distill", "from": "prune", "teacher": "teacher", "epochs": 1,
         "batch_size": 32, "loss": [{"term": "kd", "T": 4, "alpha": 0.9}]},
        {"name": "qat", "kind": "qat", "from": "distill", "teacher": "teacher", "epochs": 1,
         "batch_size": 32, "loss": [{"term": "kd", "T": 4, "alpha": 0.9}]},
        {"name": "export", "kind": "export", "models": [{"model": "qat", "format": "onnx-int8"}]},
    ],
}


@pytest.fixture
def tiny_recipe_dict(fmnist_root):
    """A fresh, valid 5-stage recipe dict (train, prune, distill, qat, export) on the
    tiny dataset of `fmnist_root`; tests may mutate it freely."""
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"]["root"] = str(fmnist_root)
    return raw
