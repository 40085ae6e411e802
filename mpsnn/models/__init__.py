"""Ready-made networks built through the public graph API: Apple's digit classifier
(:mod:`mpsnn.models.digits`) and its training sample, the main job (:mod:`mpsnn.models.train_digits`),
and ResNet-50 v1.5 for inference (:mod:`mpsnn.models.resnet`)."""
from __future__ import annotations

from .digits import DigitsDataSource, DigitsGraphs, build_digits_graphs, make_data_sources
from .resnet import build_resnet50, random_resnet50_state

__all__ = ["DigitsDataSource", "DigitsGraphs", "build_digits_graphs", "build_resnet50", "make_data_sources", "random_resnet50_state"]
