"""``mc_dropout``: the ``[guide]`` (normally ``delta``) fit as for ``bayesian``, then predicted with the
backbone's dropout layers sampling, one dropout mask per sample (see :mod:`pyrolora.runs.methods.dropout`).

Its run folder is the ``bayesian`` one; only ``[method] name`` differs.
"""

from __future__ import annotations

from pyrolora.errors import ConfigError
from pyrolora.runs.build import Run
from pyrolora.runs.methods.base import register
from pyrolora.runs.methods.bayesian import Bayesian
from pyrolora.runs.methods.dropout import dropout_layers, mc_dropout

__all__ = ["MCDropout", "dropout_layers", "mc_dropout"]


class MCDropout(Bayesian):
    """MC dropout over a fitted guide: S dropout masks instead of (or on top of) S posterior draws."""

    name = "mc_dropout"
    dropout = True

    def check(self, run: Run) -> None:
        """Refuse a backbone without dropout before training: the trained MAP could never be MC-dropout sampled."""
        if not dropout_layers(run.model.backbone):
            raise ConfigError(
                f"method mc_dropout needs dropout, but {run.config.model.name!r} has no dropout layer with p > 0; set "
                "adapter dropout ([adapters] dropout = 0.1) or use a backbone trained with dropout (e.g. MiniLM)."
            )


register(MCDropout())
