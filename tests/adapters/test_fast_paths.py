"""The orders of the small products in the LoRA-XS update, the shared input cast under autocast, the joint cast of
the cores, and what the backward pass keeps: the fast paths of issue 21 compute what the plain formula does."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pyrolora import LoraXSConfig, inject_adapters
from pyrolora.adapters.layer import LoraXSLinear
from tests.conftest import TINY_MODELS, token_batch

PATHS = ["three", "fold_a", "fold_b"]


def _layer(in_features=7, out_features=5, rank=3, dtype=torch.float64):
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features).to(dtype)
    return LoraXSLinear(base, rank, alpha=16.0, site_name="layer")


def _reference(layer, x, value):
    """``W0 x + b + (alpha / r) B R A x`` written out, one R (r, r) or one per sample block (S, r, r)."""
    a, b = layer.A, layer.B
    if value.dim() == 2:
        return layer.base(x) + layer.scaling * x @ a.T @ value.T @ b.T
    blocks = x.reshape(value.shape[0], -1, *x.shape[1:])
    update = torch.stack([blk @ a.T @ v.T @ b.T for blk, v in zip(blocks, value, strict=True)])
    return layer.base(x) + layer.scaling * update.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("samples", [None, 3])
def test_every_order_gives_the_formula_and_its_gradients(path, samples):
    layer = _layer()
    layer.path = path
    shape = (samples, 3, 3) if samples else (3, 3)
    value = (0.3 * torch.randn(*shape, dtype=torch.float64)).requires_grad_()
    x = torch.randn(6, 4, 7, dtype=torch.float64, requires_grad=True)  # 6 rows = 3 samples x 2
    layer.value = value
    out = layer(x)
    expected = _reference(layer, x, value)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)  # float64 reassociation only
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (value, x))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (value, x))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_auto_takes_three_products_under_a_gradient_and_folds_without():
    layer = _layer(in_features=64, out_features=32, rank=4)
    # training: folding would make autograd reduce a whole (out, r) or (r, in) factor over the rows
    assert layer.core_path(rows=512, samples=None, needs_grad=True) == "three"
    # prediction with many rows: one (out, r) x (r, r) product beats n (r x r) products; here out < in
    assert layer.core_path(rows=512, samples=None, needs_grad=False) == "fold_b"
    layer_up = _layer(in_features=32, out_features=64, rank=4)
    assert layer_up.core_path(rows=512, samples=None, needs_grad=False) == "fold_a"
    assert layer.core_path(rows=8, samples=None, needs_grad=False) == "three"  # fewer rows than out
    assert layer.core_path(rows=15 * 512, samples=15, needs_grad=False) == "fold_b"  # batched never folds into A
    assert layer.core_path(rows=15 * 8, samples=15, needs_grad=False) == "three"
    layer.path = "fold_a"
    assert layer.core_path(rows=15 * 8, samples=15, needs_grad=False) == "fold_b"


def test_batched_value_needs_a_leading_dimension_of_samples_times_batch():
    layer = _layer()
    layer.value = torch.zeros(4, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot hold 4 posterior samples"):
        layer(torch.randn(2, 4, 7, dtype=torch.float64))  # 8 rows in all, but 2 is not a multiple of 4


class _Shapes(TorchDispatchMode):
    """Records (operator, output shape) of every tensor operation run inside it, forward and backward."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func.overloadpacket), tuple(t.shape)))
        return out


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("samples", [None, 3])
def test_forward_and_backward_make_nothing_of_size_out_by_in_beyond_what_the_base_layer_makes(autocast, samples):
    layer = _layer(in_features=40, out_features=24, rank=4, dtype=torch.float32)
    x = torch.randn(6, 5, 40, requires_grad=True)  # 30 rows: no activation has the weight's shape
    value = (0.1 * torch.randn(*((samples,) if samples else ()), 4, 4)).requires_grad_()

    def weight_sized(with_adapter):
        layer.value = value if with_adapter else None
        with _Shapes() as mode:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = layer(x)
            out.float().sum().backward()
        return sorted(op for op, shape in mode.seen if shape in {(24, 40), (40, 24)})

    base = weight_sized(False)
    assert base  # the base product itself touches W0 (a transpose, under autocast a cast): the check can see it
    # the update works through (rows, r) and (r, r) tensors only: not one more (out, in) tensor than the base's
    assert weight_sized(True) == base
    assert value.grad is not None and value.grad.shape == value.shape


def test_the_shared_input_cast_leaves_the_base_output_bit_identical_under_autocast():
    layer = _layer(in_features=40, out_features=24, rank=4, dtype=torch.float32)
    x = torch.randn(6, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer.base(x)
        layer.value = torch.zeros(4, 4)
        got = layer(x)  # R = 0: the update adds exact zeros to the base product of the once-cast input
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


@pytest.mark.parametrize("samples", [None, 2])
def test_compute_values_casts_all_cores_at_once_with_the_same_values_and_gradients(samples):
    factory, targets, _ = TINY_MODELS["bert"]
    model = factory()
    adapters = inject_adapters(model, LoraXSConfig(rank=2, target_modules=targets))
    lead = (samples,) if samples else ()
    theta = (0.3 * torch.randn(*lead, adapters.num_latents)).requires_grad_()
    pieces = torch.split(theta, [r * c for r, c in adapters.shapes.values()], dim=-1)
    values = {n: p.view(*lead, *s) for (n, s), p in zip(adapters.shapes.items(), pieces, strict=True)}
    assert adapters.compute_values(values) == values  # autocast off: as given
    batch = token_batch()
    if samples:
        batch = {k: v.repeat(samples, 1) for k, v in batch.items()}
    results = []
    for joint in (False, True, "flat"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            used = values if not joint else adapters.compute_values(values, theta if joint == "flat" else None)
            if joint:
                assert all(v.dtype == torch.bfloat16 for v in used.values())
            with adapters.use(used):
                logits = model(**batch).logits
        (grad,) = torch.autograd.grad(logits.float().square().sum(), theta)
        results.append((logits, grad))
    for logits, grad in results[1:]:
        assert torch.equal(logits, results[0][0])  # the same bf16 cores in the same products
        assert torch.equal(grad, results[0][1])
    with pytest.raises(ValueError, match="flat must have shape"), torch.autocast("cpu", dtype=torch.bfloat16):
        adapters.compute_values(values, theta[..., :-1])
