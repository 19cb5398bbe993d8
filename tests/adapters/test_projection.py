import pytest
import torch

from pyrolora.adapters import svd_factors
from pyrolora.errors import TargetError


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
def test_factors_follow_the_convention(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    rank = 3
    a, b = svd_factors(w, rank)
    assert a.shape == (rank, shape[1]) and b.shape == (shape[0], rank)
    assert a.dtype == w.dtype and b.dtype == w.dtype
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    # B has orthonormal columns; A carries the singular values: A Aᵀ = diag(s_r²).
    torch.testing.assert_close(b.T @ b, torch.eye(rank, dtype=w.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(a @ a.T, torch.diag(s[:rank].double() ** 2), atol=1e-5, rtol=1e-5)
    # B A is the best rank-r approximation (float32 SVD: tolerance 1e-5 relative).
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    torch.testing.assert_close(b @ a, best.double(), atol=1e-5, rtol=1e-5)


def test_full_rank_factors_reconstruct_the_weight():
    w = torch.randn(4, 6, dtype=torch.float64)
    a, b = svd_factors(w, 4)
    torch.testing.assert_close(b @ a, w, atol=1e-5, rtol=1e-5)  # float32 SVD precision


def test_deterministic_and_sign_fixed():
    w = torch.randn(9, 8)
    a1, b1 = svd_factors(w, 4)
    a2, b2 = svd_factors(w.clone(), 4)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    # flipping the weight's sign flips A, not B: the sign rule pins the largest entry of each u_i positive
    a3, b3 = svd_factors(-w, 4)
    torch.testing.assert_close(b3, b1)
    torch.testing.assert_close(a3, -a1)
    pivot = b1.abs().argmax(0)
    assert (b1[pivot, torch.arange(4)] > 0).all()


def test_half_precision_weight_computes_in_float32():
    w = torch.randn(8, 6).to(torch.bfloat16)
    a, b = svd_factors(w, 2)
    assert a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16
    a32, b32 = svd_factors(w.float(), 2)
    torch.testing.assert_close(a.float(), a32, atol=2e-2, rtol=2e-2)  # bf16 rounding of the result only
    torch.testing.assert_close(b.float(), b32, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("rank", [0, 6])
def test_impossible_rank(rank):
    with pytest.raises(TargetError, match="rank"):
        svd_factors(torch.randn(5, 8), rank)
