"""Divergence checks of a training loop beyond non-finite values: a failed factorisation, a runaway loss.

Both turn what would be a raw torch error, or a silently degenerate fit, into
:class:`~pyrolora.errors.DivergenceError`, which :func:`pyrolora.fit` completes with the last good checkpoint.
"""

from __future__ import annotations

import math

from pyrolora.errors import DivergenceError

__all__ = ["RUNAWAY_FACTOR", "RunawayLoss", "factorisation_failed"]

#: A loss this many times larger (in absolute value) than the reference of :class:`RunawayLoss` is a divergence.
RUNAWAY_FACTOR = 1e4


class RunawayLoss:
    """Raise when the loss grows by orders of magnitude over its first value, though still finite.

    The reference is ``max(|L_1|, N)``: the first step's loss, at least one nat per training example (so a loss
    near zero at the start, possible with a Gaussian likelihood, does not make every later value a runaway).
    Step t diverges when ``|L_t| > RUNAWAY_FACTOR · reference``. A healthy fit's loss falls from ``L_1``;
    what may raise it, the KL term growing under a KL warm-up, is bounded by the latents' prior terms, about a
    few nats per latent (hundreds of times ``N`` only for thousands of latents and a handful of examples), while
    the learning rates that wreck a fit push it up by six orders of magnitude or more (e.g. a MAP fit at lr 1e6:
    from 33 to 6.5e10 in one step).
    """

    def __init__(self, dataset_size: int, factor: float = RUNAWAY_FACTOR) -> None:
        self.floor = float(max(dataset_size, 1))
        self.factor = factor
        self.reference: float | None = None

    def resume(self, losses: list[float]) -> None:
        """Take the reference from the history of a resumed fit (its first loss), as the uninterrupted fit did."""
        if losses:
            self.reference = max(abs(losses[0]), self.floor)

    def __call__(self, step: int, loss: float, num_steps: int, lr: float) -> None:
        """Check the loss of ``step`` (0-based)."""
        if not math.isfinite(loss):
            return  # reported by the caller's own non-finite check
        if self.reference is None:
            self.reference = max(abs(loss), self.floor)
            return
        if abs(loss) > self.factor * self.reference:
            raise DivergenceError(
                f"the loss ran away at step {step + 1} of {num_steps}: {loss:.3g}, more than {self.factor:.0e} times "
                f"its first value's scale ({self.reference:.3g}); the fit is degenerate. Lower lr (now {lr:.3g}) or "
                "enable clip_norm."
            )


def factorisation_failed(err: Exception, step: int, num_steps: int, lr: float) -> DivergenceError:
    """The DivergenceError for a ``torch.linalg.LinAlgError`` raised inside a step (e.g. the low-rank guide's
    Cholesky factor of ``L Lᵀ + diag(d)`` after its parameters blew up)."""
    return DivergenceError(
        f"the guide's covariance could not be factorised at step {step + 1} of {num_steps} (its parameters "
        f"diverged): lower lr (now {lr:.3g}), enable clip_norm, or use a smaller init_scale for the guide. "
        f"torch said: {str(err).splitlines()[0][:200]}"
    )
