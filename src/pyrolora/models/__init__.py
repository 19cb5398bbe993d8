"""Pyro model definitions: priors, likelihoods and the Bayesian LoRA-XS model tying them to a backbone."""

from pyrolora.models import likelihoods, priors
from pyrolora.models.bayesian import BayesianLoraModel

__all__ = ["BayesianLoraModel", "likelihoods", "priors"]
