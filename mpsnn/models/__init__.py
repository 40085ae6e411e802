"""Ready-made networks built through the public graph API: Apple's digit classifier
(:mod:`mpsnn.models.digits`) and its training sample, the main job (:mod:`mpsnn.models.train_digits`)."""
from __future__ import annotations

from .digits import DigitsDataSource, DigitsGraphs, build_digits_graphs, make_data_sources

__all__ = ["DigitsDataSource", "DigitsGraphs", "build_digits_graphs", "make_data_sources"]
