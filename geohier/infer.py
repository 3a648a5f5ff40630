"""Deprecated: split into ``geohier.combine`` (keep rules, the combination, metrics) and
``geohier.predictor`` (the Predictor). Kept only for ``pipeline/evaluate.py``'s
``infer.Tree`` / ``infer.combine`` until it imports ``geohier.combine``; then delete it."""

from geohier.combine import Tree, combine

__all__ = ["Tree", "combine"]
