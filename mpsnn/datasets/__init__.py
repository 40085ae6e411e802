"""Data sets bundled with mpsnn (used by the demo, the examples and the tests).

* :func:`load_mnist` — the original MNIST IDX files shipped in ``mpsnn/data/mnist/``.
"""
from __future__ import annotations

from .mnist import MNIST_MEAN, MNIST_SPLITS, MNIST_STD, load_mnist, mnist_data_dir

__all__ = ["MNIST_MEAN", "MNIST_SPLITS", "MNIST_STD", "load_mnist", "mnist_data_dir"]
