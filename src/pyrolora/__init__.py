"""pyrolora: Bayesian LoRA-XS as a Pyro probabilistic program."""

from pyrolora import diagnostics
from pyrolora._version import __version__
from pyrolora.adapters import AdapterSet, LoraXSConfig, LoraXSLinear, inject_adapters
from pyrolora.errors import PyroloraError
from pyrolora.evaluation import metrics
from pyrolora.inference import FitResult, Prediction, fit, fit_posterior, guides, predict
from pyrolora.models import BayesianLoraModel, PyroLoraModel, likelihoods, priors

__all__ = [
    "AdapterSet",
    "BayesianLoraModel",
    "FitResult",
    "LoraXSConfig",
    "LoraXSLinear",
    "Prediction",
    "PyroLoraModel",
    "PyroloraError",
    "__version__",
    "diagnostics",
    "fit",
    "fit_posterior",
    "guides",
    "inject_adapters",
    "likelihoods",
    "metrics",
    "predict",
    "priors",
]
