"""Posterior families and how they are fit: guide factories, SVI ``fit``, Bayesian model averaging."""

from pyrolora.inference import distributed, guides
from pyrolora.inference.posterior import fit_posterior
from pyrolora.inference.predict import Prediction, draw_latents, draws_needed, predict
from pyrolora.inference.svi import FitResult, fit

__all__ = [
    "FitResult",
    "Prediction",
    "distributed",
    "draw_latents",
    "draws_needed",
    "fit",
    "fit_posterior",
    "guides",
    "predict",
]
