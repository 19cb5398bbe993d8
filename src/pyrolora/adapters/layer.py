"""The LoRA-XS layer: a frozen linear map plus ``(alpha / r) · B R A x`` with a latent R."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pyrolora.adapters.projection import svd_factors
from pyrolora.errors import TargetError

__all__ = ["CorePath", "LoraXSLinear", "base_weight", "is_supported_layer"]

#: The order of the small products in ``(alpha / r) · B R A x`` (see :meth:`LoraXSLinear.core_path`):
#: ``"three"`` computes ``((x Aᵀ) Rᵀ) Bᵀ``, ``"fold_b"`` folds R into B (``(x Aᵀ)(B R)ᵀ``), ``"fold_a"`` into A
#: (``(x (R A)ᵀ) Bᵀ``); ``"auto"`` picks the cheapest for the batch at hand.
CorePath = Literal["auto", "three", "fold_a", "fold_b"]


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep the adapter usable without it
        return None
    return Conv1D


_CONV1D = _conv1d_type()


def _add_product(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out + h weightᵀ`` with out (..., o), h (..., k), weight (o, k): one ``addmm`` where out is contiguous.

    The addition happens inside the matrix product (beta = 1), so no separate elementwise pass reads and writes
    the (..., o) output; its backward passes the output gradient through to ``out`` as it is.
    """
    if out.is_contiguous() and out.dim() >= 1:
        flat = out.view(-1, out.shape[-1])  # (rows, o)
        return torch.addmm(flat, h.reshape(-1, h.shape[-1]), weight.t()).view(out.shape)
    return out + F.linear(h, weight)


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
        #: the order of the small products (:data:`CorePath`); ``"auto"`` picks the cheapest per call
        self.path: CorePath = "auto"

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

    def core_path(self, rows: int, samples: int | None, needs_grad: bool) -> CorePath:
        """Which order of the small products of the update :meth:`forward` takes (see :data:`CorePath`).

        With ``n`` rows (``rows / S`` per sample for a batched value), the products that differ between the
        orders cost, in multiply-adds (forward, and backward where ``R`` needs a gradient)::

            "three":  n r² (g = h Rᵀ)                     + 2 n r² (∂R = ∂gᵀ h, ∂h = ∂g R)
            "fold_b": out r² (B R)                         + n out r + out r² (∂(B R) reduces over the n rows)
            "fold_a": in r² (R A)                          + n in r + in r²   (2-D values only)

        Every order also runs ``x Aᵀ`` (or ``x (R A)ᵀ``) and one product with an (out, r) factor, which cost the
        same in all three. Under a gradient, folding R into a factor makes autograd compute the gradient of the
        whole folded (out, r) or (r, in) factor, a reduction over all n rows; the three small products avoid it.
        Without a gradient (prediction), folding is cheaper once n exceeds the factor's long side. The batched
        path never folds into A: that would turn the shared ``x Aᵀ`` into S separate products.
        The attribute ``path`` (default ``"auto"``) forces one order, for tests and benchmarks.
        """
        if self.path != "auto":
            if self.path == "fold_a" and samples is not None:
                return "fold_b"
            return self.path
        # plain comparisons, no min(..., key=...): torch.compile traces this per layer without a graph break
        r2, n = self.rank * self.rank, rows // samples if samples else rows
        grad = 1 if needs_grad else 0
        three = n * r2 * (1 + 2 * grad)
        fold_b = self.out_features * r2 * (1 + grad) + grad * n * self.out_features * self.rank
        fold_a = self.in_features * r2 * (1 + grad) + grad * n * self.in_features * self.rank
        if samples is None and fold_a < fold_b and fold_a < three:
            return "fold_a"
        return "fold_b" if fold_b < three else "three"  # ties: the three products

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self.value
        if value is None or self._merged_delta is not None:
            return self.base(x)
        device_type = x.device.type
        autocasting = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocasting else self.A.dtype
        if autocasting and x.dtype == torch.float32 and dtype != torch.float32:
            # Autocast would cast x once for the base product and again for x Aᵀ; one cast serves both (the same
            # rounding, so the base output is bit-identical) and autograd sums the two input gradients before
            # casting them back once. (Autocast leaves float64 alone, so only float32 inputs are cast here.)
            x = x.to(dtype)
        out = self.base(x)  # (..., out)
        a, b = self.compute_factors(dtype)  # (r, in), (out, r) with the scaling folded in
        if self.dropout is not None:
            x = self.dropout(x)  # (..., in): its own mask per row, so per sample of a batched forward
        core = value.to(dtype)  # a no-op when the caller cast all cores at once (AdapterSet.cast_values)
        rows = x.numel() // self.in_features
        needs_grad = torch.is_grad_enabled() and value.requires_grad
        if value.dim() == 2:
            path = self.core_path(rows, None, needs_grad)
            if path == "fold_a":
                h = F.linear(x, torch.mm(core, a))  # (..., r): x (R A)ᵀ
                return _add_product(out, h, b)  # (..., out)
            h = F.linear(x, a)  # (..., r)
            if path == "fold_b":
                return _add_product(out, h, torch.mm(b, core))  # (..., out): h (B R)ᵀ
            return _add_product(out, F.linear(h, core), b)  # (..., out): (h Rᵀ) Bᵀ
        samples = value.shape[0]
        if x.dim() < 2 or x.shape[0] % samples:
            raise ValueError(
                f"{self.site_name!r}: a batch of {x.shape[0] if x.dim() > 1 else 1} rows cannot hold {samples} "
                "posterior samples; "
                "the leading dimension must be samples x batch."
            )
        h = F.linear(x, a).reshape(samples, -1, self.rank)  # (S, n, r), sample-major rows
        if self.core_path(rows, samples, needs_grad) == "three":
            g = torch.bmm(h, core.transpose(1, 2))  # (S, n, r): row block s times R_sᵀ
            return _add_product(out, g.reshape(*out.shape[:-1], self.rank), b)  # (..., out)
        b_s = torch.matmul(b, core)  # (S, out, r): each sample's core folded into B
        if out.is_contiguous():
            # out + h_s (B R_s)ᵀ for every block s in one batched product that also does the addition
            flat = out.view(samples, -1, self.out_features)  # (S, n, out)
            return torch.baddbmm(flat, h, b_s.transpose(1, 2)).view(out.shape)
        update = torch.bmm(h, b_s.transpose(1, 2))  # (S, n, out)
        return out + update.reshape(out.shape)  # (..., out)

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
