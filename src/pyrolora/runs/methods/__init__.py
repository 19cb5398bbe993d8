"""The methods of ``[method] name``, one module each, behind the protocol of :mod:`.base`.

``METHODS[name]`` is the only place a method is chosen by name: ``bayesian`` (any guide), ``mc_dropout``,
``ensemble``, ``peft_lora``. A new method is one module here with a :func:`~.base.register` call, imported below.
"""

from pyrolora.runs.methods import bayesian, ensemble, mc_dropout, peft_lora
from pyrolora.runs.methods.base import METHODS, Fitted, Method, count_numel, get, register

__all__ = [
    "METHODS",
    "Fitted",
    "Method",
    "bayesian",
    "count_numel",
    "ensemble",
    "get",
    "mc_dropout",
    "peft_lora",
    "register",
]
