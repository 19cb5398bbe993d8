"""Evaluation: calibration and accuracy metrics, and the plots people look at (matplotlib imported lazily)."""

from pyrolora.evaluation.metrics import accuracy, brier, ece, entropy, mcc, nll, rank_correlation, reliability

__all__ = ["accuracy", "brier", "ece", "entropy", "mcc", "nll", "rank_correlation", "reliability"]
