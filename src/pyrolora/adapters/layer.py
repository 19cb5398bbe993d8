"""The LoRA-XS layer: a frozen linear map plus ``(alpha / r) · B R A x`` with a latent R."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyrolora.adapters.projection import svd_factors
from pyrolora.errors import TargetError

__all__ = ["LoraXSLinear", "base_weight", "is_supported_layer"]


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep the adapter usable without it
        return None
    return Conv1D


_CONV1D = _conv1d_type()


def is_supported_layer(module: nn.Module) -> bool:
    """Whether ``module`` can carry a LoRA-XS adapter (``nn.Linear`` or transformers' ``Conv1D``)."""
    return isinstance(module, nn.Linear) or (_CONV1D is not None and isinstance(module, _CONV1D))


def base_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a supported layer in torch's (out, in) layout (``Conv1D`` stores (in, out))."""
    if isinstance(module, nn.Linear):
        return module.weight
    if _CONV1D is not None and isinstance(module, _CONV1D):
        return module.weight.t()
    raise TargetError(
        f"LoRA-XS supports nn.Linear and transformers' Conv1D, not {type(module).__name__}; "
        "choose target_modules that name linear layers."
    )


class LoraXSLinear(nn.Module):
    """A frozen linear layer with a LoRA-XS update whose core ``R`` is supplied from outside.

    Computes ``y = base(x) + (alpha / r) · B R A x`` where ``A`` (r, in) and ``B`` (out, r) are frozen buffers
    from :func:`~pyrolora.adapters.projection.svd_factors` and ``R`` (r, r) is the current value of the latent
    site ``site_name``. The layer owns no parameters of its own and knows nothing of Pyro: the Bayesian model
    samples R and sets it through :meth:`AdapterSet.use <pyrolora.adapters.model.AdapterSet.use>`. While no
    value is set, the layer is exactly the base layer (the update is skipped, not added as zero).

    Adapter dropout (``dropout = p > 0``): the update branch reads ``dropout(x)`` instead of ``x``, i.e.
    ``y = base(x) + (alpha / r) · B R A dropout(x)``, with an ``nn.Dropout`` (active in train mode, so during
    :func:`pyrolora.fit`; in eval mode only inside ``runs.methods.dropout.mc_dropout``). It gives MC dropout
    to backbones trained without dropout (Llama). With ``p = 0`` there is no dropout module at all.

    Batched posterior samples: if the value has shape (S, r, r), the input's leading dimension must be S·B with
    the S samples outermost (sample-major, as produced by ``x.repeat(S, ...)``), and sample s is applied to
    rows ``s·B .. (s+1)·B - 1``. One forward pass then evaluates S posterior draws.

    Args:
        base: the frozen ``nn.Linear`` or ``Conv1D`` to wrap; its parameters are set to not require gradients.
        rank: the SVD rank r.
        alpha: scaling numerator; the update is multiplied by ``alpha / rank``.
        site_name: the name of the latent site, by convention the module's dotted path in the backbone.
        dropout: probability p of zeroing an input entry of the update branch (0: none).
    """

    A: torch.Tensor
    B: torch.Tensor

    def __init__(self, base: nn.Module, rank: int, alpha: float, site_name: str, dropout: float = 0.0) -> None:
        super().__init__()
        if not is_supported_layer(base):
            raise TargetError(
                f"module {site_name!r} is a {type(base).__name__}; LoRA-XS supports nn.Linear and "
                "transformers' Conv1D. Narrow target_modules to linear layers."
            )
        weight = base_weight(base)  # (out, in)
        self.out_features, self.in_features = weight.shape
        if rank > min(self.out_features, self.in_features):
            raise TargetError(
                f"rank {rank} exceeds min(out={self.out_features}, in={self.in_features}) of module "
                f"{site_name!r}; choose rank <= {min(self.out_features, self.in_features)} or exclude it."
            )
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.site_name = site_name
        # x -> dropout(x) on the update branch only; with p = 0 no module at all, so such a layer is exactly as before
        self.dropout: nn.Dropout | None = nn.Dropout(dropout) if dropout > 0 else None
        a, b = svd_factors(weight, rank)
        self.register_buffer("A", a)  # (r, in)
        self.register_buffer("B", b)  # (out, r)
        self.value: torch.Tensor | None = None  # (r, r) or (S, r, r), set by AdapterSet.use
        self._merged_delta: torch.Tensor | None = None  # (out, in) added to the base weight by merge()
        # (dtype, device) -> (A, scaling·B) in that compute dtype, and the buffers they were made from.
        self._compute_cache: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    @property
    def shape(self) -> tuple[int, int]:
        """The event shape of the latent R, ``(rank, rank)``."""
        return (self.rank, self.rank)

    @property
    def merged(self) -> bool:
        """Whether an update is currently folded into the base weight."""
        return self._merged_delta is not None

    def delta_weight(self, value: torch.Tensor) -> torch.Tensor:
        """The dense update ``(alpha / r) · B R A`` (out, in) for one R (r, r), computed in float32 or wider."""
        if value.shape != self.shape:
            raise ValueError(f"expected R of shape {self.shape} for {self.site_name!r}, got {tuple(value.shape)}")
        dtype = torch.promote_types(self.A.dtype, torch.float32)  # at least float32, float64 for float64 weights
        b, a = self.B.to(dtype), self.A.to(dtype)
        return self.scaling * (b @ value.to(dtype) @ a)  # (out, in)

    def compute_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` (r, in) and ``(alpha / r) · B`` (out, r) in ``dtype``, cast once and cached.

        The frozen buffers stay as stored (the saved and exported convention); the forward pass reads these
        copies, so a step under autocast or in a lower precision does not cast the factors again. The cache
        follows the buffers: a move (``.to``) or an in-place change of ``A`` or ``B`` rebuilds it.
        """
        a, b = self.A, self.B
        key = (dtype, a.device)
        hit = self._compute_cache.get(key)
        if hit is not None and hit[2] is a and hit[3] is b and hit[4] == (a._version, b._version):
            return hit[0], hit[1]
        with torch.no_grad():
            a_c = a.to(dtype).contiguous()  # (r, in)
            b_c = (self.scaling * b.to(torch.promote_types(b.dtype, torch.float32))).to(dtype).contiguous()  # (out, r)
        self._compute_cache = {key: (a_c, b_c, a, b, (a._version, b._version))}
        return a_c, b_c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., out)
        value = self.value
        if value is None or self._merged_delta is not None:
            return out
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else self.A.dtype
        a, b = self.compute_factors(dtype)  # (r, in), (out, r) with the scaling folded in
        if self.dropout is not None:
            x = self.dropout(x)  # (..., in): its own mask per row, so per sample of a batched forward
        h = F.linear(x, a)  # (..., r)
        if value.dim() == 2:
            # B (s R) A x = (B s R)(A x): the r x r core is folded into B, one small (out, r) product per step.
            return out + F.linear(h, torch.mm(b, value.to(dtype)))  # (..., out)
        samples = value.shape[0]
        if h.shape[0] % samples:
            raise ValueError(
                f"{self.site_name!r}: a batch of {h.shape[0]} rows cannot hold {samples} posterior samples; "
                "the leading dimension must be samples x batch."
            )
        b_s = torch.matmul(b, value.to(dtype))  # (S, out, r): each sample's core folded into B
        update = torch.bmm(h.reshape(samples, -1, self.rank), b_s.transpose(1, 2))  # (S, rows/S, out)
        return out + update.reshape(*h.shape[:-1], self.out_features)  # (..., out)

    @torch.no_grad()
    def merge(self, value: torch.Tensor | None = None) -> None:
        """Fold ``(alpha / r) · B R A`` into the base weight, using ``value`` or the current value of R.

        While merged, the forward pass is a single dense layer. :meth:`unmerge` subtracts the same update
        (exact up to floating-point rounding of the add and subtract).
        """
        if self.merged:
            raise RuntimeError(f"{self.site_name!r} is already merged; call unmerge() first.")
        value = self.value if value is None else value
        if value is None:
            raise ValueError(f"{self.site_name!r} has no value of R to merge; pass one or set it first.")
        delta = self.delta_weight(value)  # (out, in)
        weight = self.base.weight
        weight.add_((delta if isinstance(self.base, nn.Linear) else delta.t()).to(weight.dtype))
        self._merged_delta = delta

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        if self._merged_delta is None:
            raise RuntimeError(f"{self.site_name!r} is not merged.")
        delta = self._merged_delta
        weight = self.base.weight
        weight.sub_((delta if isinstance(self.base, nn.Linear) else delta.t()).to(weight.dtype))
        self._merged_delta = None

    def extra_repr(self) -> str:
        return (
            f"site={self.site_name!r}, in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha:g}"
        )
