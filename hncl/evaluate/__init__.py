"""Evaluation of FER models: metrics, kNN on frozen features, neighbour diagnostics, plots."""
