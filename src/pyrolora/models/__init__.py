"""Pyro model definitions: priors, likelihoods and the Bayesian LoRA-XS model tying them to a backbone."""

from pyrolora.models import likelihoods, priors
from pyrolora.models.bayesian import BayesianLoraModel
from pyrolora.models.pyro_module import PyroLoraModel

__all__ = ["BayesianLoraModel", "PyroLoraModel", "likelihoods", "priors"]
