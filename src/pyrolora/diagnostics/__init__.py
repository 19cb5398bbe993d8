"""Diagnostics: ArviZ conversion, posterior summaries, Pareto-k, covariance spectra, pictures and the report.

ArviZ and matplotlib are imported only inside the functions that use them.
"""

from pyrolora.diagnostics.convert import (
    chain_draws,
    load_inference_data,
    pointwise,
    save_inference_data,
    to_inference_data,
)
from pyrolora.diagnostics.spectrum import Spectrum, covariance_spectrum, empirical_spectrum, flatten_draws
from pyrolora.diagnostics.summaries import ParetoK, pareto_k, pareto_k_threshold, site_summary, summary

__all__ = [
    "ParetoK",
    "Spectrum",
    "chain_draws",
    "covariance_spectrum",
    "empirical_spectrum",
    "flatten_draws",
    "load_inference_data",
    "pareto_k",
    "pareto_k_threshold",
    "pointwise",
    "save_inference_data",
    "site_summary",
    "summary",
    "to_inference_data",
]
