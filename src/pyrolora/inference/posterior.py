"""One call that fits any registered posterior family with its own procedure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from pyrolora.errors import ConfigError
from pyrolora.inference.svi import FitResult, fit
from pyrolora.models import BayesianLoraModel

__all__ = ["fit_posterior"]


def fit_posterior(model: BayesianLoraModel, guide: nn.Module, data: Iterable[Any], **fit_kwargs: Any) -> FitResult:
    """Fit ``guide`` by its family's whole procedure; the keyword arguments are :func:`pyrolora.fit`'s.

    Variational guides (``lowrank``, ``diagonal``, ``full``, ``meanfield``, ``blockwise``, ``flow``) and
    ``delta`` are fit by SVI, exactly :func:`~pyrolora.fit`. Guides with a ``fit_posterior(model, data,
    **fit_kwargs)`` method run it instead: ``laplace`` (MAP, then the damped Hessian), ``swag`` (MAP, then
    collection of iterates), ``nuts`` (MAP when ``num_epochs``/``num_steps`` is given, then the chains).

    Periodic checkpoints (``checkpoint_dir``) cover SVI only: the multi-phase procedures are not checkpointed
    (``checkpoint_dir`` is ignored for them) and cannot be resumed (``resume_from`` raises ConfigError).
    """
    procedure = getattr(guide, "fit_posterior", None)
    if procedure is not None:
        if fit_kwargs.pop("resume_from", None) is not None:
            raise ConfigError(
                f"resuming is supported for SVI guides only; the {type(guide).__name__} procedure has several "
                "phases and is not checkpointed. Start the run again without --resume."
            )
        fit_kwargs.pop("validation", None)  # these families have their own spread settings (e.g. SWAG's scale)
        fit_kwargs.pop("temperatures", None)
        fit_kwargs.pop("checkpoint_dir", None)
        fit_kwargs.pop("checkpoint_every", None)
        fit_kwargs.pop("checkpoint_tag", None)
        return procedure(model, data, **fit_kwargs)
    return fit(model, guide, data, **fit_kwargs)
