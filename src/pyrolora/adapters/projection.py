"""Frozen LoRA-XS factors from the truncated SVD of a pretrained weight."""

from __future__ import annotations

import torch

from pyrolora.errors import TargetError

__all__ = ["svd_factors"]


@torch.no_grad()
def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen factors ``A`` and ``B`` of a LoRA-XS adapter.

    With the truncated SVD ``W0 ≈ U_r diag(s_r) V_rᵀ`` of ``weight`` (out, in), returns
    ``A = diag(s_r) V_rᵀ`` of shape (rank, in) and ``B = U_r`` of shape (out, rank): the singular values sit on
    the input side. The SVD is computed in float32 on the weight's device and the factors are returned in the
    weight's dtype.

    The result is deterministic: singular vectors are unique only up to a joint sign flip of ``u_i`` and
    ``v_i``, so each pair is flipped such that the entry of largest magnitude in ``u_i`` is positive.

    Args:
        weight: the frozen weight W0 in torch's (out, in) layout.
        rank: number of singular directions kept, ``1 <= rank <= min(out, in)``.

    Returns:
        ``(A, B)`` with shapes (rank, in) and (out, rank).
    """
    if weight.dim() != 2:
        raise TargetError(f"expected a 2-D weight (out, in), got shape {tuple(weight.shape)}.")
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise TargetError(
            f"rank {rank} is impossible for a weight of shape (out={out_features}, in={in_features}); "
            f"choose a rank between 1 and {min(out_features, in_features)}."
        )
    w = weight.detach().to(torch.float32)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in) with k = min(out, in)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]  # (out, r), (r,), (r, in)
    pivot = u.abs().argmax(dim=0)  # (r,) row of the largest |u_i| entry
    signs = torch.sign(u[pivot, torch.arange(rank, device=u.device)])  # (r,)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    u = u * signs  # (out, r)
    vh = vh * signs[:, None]  # (r, in)
    a = s[:, None] * vh  # (r, in)
    return a.to(weight.dtype).contiguous(), u.to(weight.dtype).contiguous()
