"""Whether a guide has been fitted (or loaded), and the error for one that has not."""

from __future__ import annotations

from torch import nn

from pyrolora.errors import ConfigError

__all__ = ["is_fitted", "require_fitted"]


def is_fitted(guide: nn.Module) -> bool:
    """False for a guide that was never fitted nor loaded.

    Pyro's autoguides create their parameters on the first call, so one without a ``prototype_trace`` has none
    yet; guides with a ``fitted()`` method (NUTS chains) answer themselves; a SWAG guide needs collected iterates.
    """
    fitted = getattr(guide, "fitted", None)
    if callable(fitted):
        return bool(fitted())
    if getattr(guide, "prototype_trace", True) is None:
        return False
    collected = getattr(guide, "num_collected", None)
    return collected is None or collected > 0


def require_fitted(guide: nn.Module, action: str) -> None:
    """Raise unless ``guide`` is fitted.

    Raises:
        ConfigError: naming the action and what to do first.
    """
    if not is_fitted(guide):
        raise ConfigError(
            f"cannot {action}: the {type(guide).__name__} guide has not been fitted, so it holds no posterior (only "
            "its initial values). Fit it first with pyrolora.fit(model, guide, data) (or fit_posterior), or load a "
            "saved run into it."
        )
