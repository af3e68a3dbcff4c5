"""The top-r solver ``svd_method="subspace"``: exact where it converges, an exact fallback
where it does not, deterministic, and blind to the global RNG."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from lrpet_lightning.core import project_low_rank_
from lrpet_lightning.core.linalg import (
    SVD_METHODS,
    project_matrix,
    ritz_angle_bound,
    subspace_triplets,
    top_singular_triplets,
)

F64 = torch.float64


def _gapped(rows: int, cols: int, r: int, tail: float = 0.05, seed: int = 0,
            dtype: torch.dtype = F64) -> Tensor:
    """A matrix with singular values in [1, 2] up to ``r`` and below ``tail`` after it: the
    state of a weight one epoch after a projection."""
    g = torch.Generator().manual_seed(seed)
    n = min(rows, cols)
    U = torch.linalg.qr(torch.randn(rows, n, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(cols, n, generator=g, dtype=F64)).Q
    s = torch.cat([torch.linspace(2, 1, r, dtype=F64),
                   tail * torch.rand(n - r, generator=g, dtype=F64)])
    return ((U * s) @ V.mT).to(dtype)


def _truncation(t) -> Tensor:
    return (t.U.double() * t.s.double()) @ t.V.double().mT


def test_subspace_is_a_method() -> None:
    assert "subspace" in SVD_METHODS


# rows x cols x r: explicit Gram (8k >= n), the implicit A (A^T X) path, tall and wide
SHAPES = [(96, 300, 20), (300, 96, 20), (256, 700, 8), (700, 256, 8)]


@pytest.mark.parametrize(("rows", "cols", "r"), SHAPES)
def test_agrees_with_exact_in_float64(rows: int, cols: int, r: int) -> None:
    M = _gapped(rows, cols, r)
    t = subspace_triplets(M, r)
    assert t is not None, "converges on a matrix with a gap at the cut"
    e = top_singular_triplets(M, r, "exact")
    assert_close(t.s, e.s, rtol=1e-9, atol=0)
    assert_close(t.energy, e.energy, rtol=1e-12, atol=0)
    assert_close(_truncation(t), _truncation(e), rtol=0, atol=1e-9)
    out = project_matrix(M, r, svd_method="subspace").matrix
    assert_close(out, project_matrix(M, r, svd_method="exact").matrix, rtol=0, atol=1e-9)


@pytest.mark.parametrize(("rows", "cols", "r"), SHAPES)
def test_agrees_with_exact_in_float32(rows: int, cols: int, r: int) -> None:
    M = _gapped(rows, cols, r)
    t = subspace_triplets(M.float(), r)
    assert t is not None and t.U.dtype == torch.float32 and t.V.dtype == torch.float32
    truth = _truncation(top_singular_triplets(M, r, "exact"))
    err = (_truncation(t) - truth).norm() / truth.norm()
    assert err < 1e-5
    out = project_matrix(M.float(), r, svd_method="subspace").matrix
    assert out.dtype == torch.float32
    truth = project_matrix(M, r, svd_method="exact").matrix
    assert (out.double() - truth).norm() / truth.norm() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_no_gap_falls_back_to_gram(dtype: torch.dtype) -> None:
    # Random init: no gap at the cut. Repeated singular values at the cut: none at all.
    g = torch.Generator().manual_seed(3)
    rand = torch.randn(96, 300, generator=g, dtype=F64) / 300**0.5
    U = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(300, 96, generator=g, dtype=F64)).Q
    repeated = (U * torch.cat([torch.full((30,), 1.0, dtype=F64),
                               torch.linspace(0.5, 0.1, 66, dtype=F64)])) @ V.mT
    for M, r in ((rand, 20), (repeated, 20)):
        M = M.to(dtype)
        assert subspace_triplets(M, r) is None
        got = top_singular_triplets(M, r, "subspace")
        gram = top_singular_triplets(M, r, "gram")
        for a, b in zip(got, gram, strict=True):
            assert torch.equal(a, b)
    for M, r in ((rand, 20),):  # (the repeated one has no unique truncation to compare)
        M = M.to(dtype)
        truth = project_matrix(M.double(), r, svd_method="exact").matrix
        out = project_matrix(M, r, svd_method="subspace").matrix
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        assert (out.double() - truth).norm() / truth.norm() < tol


def test_deterministic_and_global_rng_untouched() -> None:
    M = _gapped(96, 300, 20, dtype=torch.float32)
    state = torch.random.get_rng_state()
    a = subspace_triplets(M, 20)
    b = subspace_triplets(M, 20)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a is not None and b is not None
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    torch.manual_seed(123)  # another global RNG state: the same result
    for x, y in zip(subspace_triplets(M, 20), a, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("r", [40, 47, 48])
def test_r_close_to_n_uses_gram(r: int) -> None:
    M = _gapped(48, 200, r)
    assert subspace_triplets(M, r) is None  # r + oversample > n / 2
    out = project_matrix(M, r, svd_method="subspace").matrix
    assert_close(out, project_matrix(M, r, svd_method="exact").matrix, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_zero_and_rank_deficient_matrices(dtype: torch.dtype) -> None:
    Z = torch.zeros(96, 300, dtype=dtype)
    assert subspace_triplets(Z, 20) is None
    result = project_matrix(Z, 20, svd_method="subspace")
    assert torch.equal(result.matrix, Z) and result.top_singular_value == 0.0
    # rank 10 < r = 20: zero singular values at the cut, no gap: the exact path.
    g = torch.Generator().manual_seed(5)
    low = (torch.randn(96, 10, generator=g, dtype=F64) @ torch.randn(10, 300, generator=g,
                                                                   dtype=F64)).to(dtype)
    out = project_matrix(low, 20, svd_method="subspace").matrix
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert (out.double() - low.double()).norm() / low.double().norm() < tol


def test_tiny_matrices() -> None:
    for rows, cols, r in [(1, 1, 1), (2, 3, 1), (3, 2, 2), (5, 40, 2)]:
        M = torch.randn(rows, cols, dtype=F64)
        out = project_matrix(M, r, svd_method="subspace").matrix
        assert_close(out, project_matrix(M, r, svd_method="exact").matrix, rtol=0, atol=1e-10)


def test_bn_rectified_projection() -> None:
    M = _gapped(96, 300, 20)
    scale = torch.linspace(0.2, 3.0, 96, dtype=F64)
    out = project_matrix(M / scale.reshape(-1, 1), 20, scale=scale, svd_method="subspace")
    ref = project_matrix(M / scale.reshape(-1, 1), 20, scale=scale, svd_method="exact")
    assert_close(out.matrix, ref.matrix, rtol=0, atol=1e-9)
    assert out.kept_energy == pytest.approx(ref.kept_energy, rel=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    M = _gapped(96, 300, 20)
    cpu = subspace_triplets(M, 20)
    gpu = subspace_triplets(M.cuda(), 20)
    assert cpu is not None and gpu is not None
    assert_close(_truncation(gpu).cpu(), _truncation(cpu), rtol=0, atol=1e-9)


def test_project_low_rank_end_to_end() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64)).double()
    x = torch.randn(2, 3, 12, 12, dtype=F64)
    with torch.no_grad():  # a projected model plus a small change: a gap at the cut
        project_low_rank_(model, rank_ratio=0.25, example_inputs=x, svd_method="exact")
        for conv in (model[0], model[3]):
            conv.weight.add_(1e-3 * torch.randn_like(conv.weight))
    reference = [conv.weight.clone() for conv in (model[0], model[3])]
    exact = copy.deepcopy(model)
    records = project_low_rank_(model, rank_ratio=0.25, example_inputs=x,
                                svd_method="subspace")
    project_low_rank_(exact, rank_ratio=0.25, example_inputs=x, svd_method="exact")
    assert [r.rank for r in records] == [6, 16] and all(r.skipped is None for r in records)
    for conv, ref, before in zip((model[3],), (exact[3],), reference[1:], strict=True):
        assert not torch.equal(conv.weight, before)
        assert_close(conv.weight, ref.weight, rtol=0, atol=1e-9)
    assert_close(model[0].weight, exact[0].weight, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_ritz_angle_bound_bounds_the_true_angle(seed: int) -> None:
    # Rayleigh-Ritz on a slightly wrong block (a perturbed top-k basis) of a symmetric S with
    # a spread-out top of the spectrum: the bound from the Ritz residuals is never below the
    # true ||sin Theta||_F, and not far above it.
    g = torch.Generator().manual_seed(seed)
    n, r, k = 60, 12, 16
    Q0 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q
    tail = (0.2 * torch.rand(n - r, generator=g, dtype=F64)).sort(descending=True).values
    lam_true = torch.cat([torch.logspace(2, 0.3, r, dtype=F64), tail])
    S = (Q0 * lam_true) @ Q0.mT
    for noise in (1e-2, 1e-4, 1e-7):
        block = Q0[:, :k] + noise * torch.randn(n, k, generator=g, dtype=F64)
        Q = torch.linalg.qr(block).Q
        lam, W = torch.linalg.eigh(Q.mT @ S @ Q)
        lam, U = lam.flip(0), Q @ W.flip(1)
        resid = torch.linalg.vector_norm(S @ U - U * lam, dim=0)
        bound = ritz_angle_bound(lam, resid, r)
        outside = Q0[:, r:]  # the eigenvectors beyond the r-th
        true = float(torch.linalg.matrix_norm(outside.mT @ U[:, :r]))
        assert true <= bound <= 10 * true + 1e-12
        one_gap = float(torch.linalg.vector_norm(resid[:r])) / float(lam[r - 1] - lam[r] - resid[r])
        assert bound <= one_gap  # never looser than the one-gap form it replaced


def test_ritz_angle_bound_is_inf_without_a_gap() -> None:
    lam = torch.tensor([3.0, 1.0, 1.0], dtype=F64)
    assert ritz_angle_bound(lam, torch.zeros(3, dtype=F64), 2) == float("inf")
    close = torch.tensor([3.0, 1.2, 1.0], dtype=F64)  # 1.2 does not clear 1.0 + 0.3
    assert ritz_angle_bound(close, torch.tensor([0, 0, 0.3], dtype=F64), 2) == float("inf")


def test_float32_converges_on_a_trained_resnet_layer_shape() -> None:
    # A 512 x 4608 conv weight (ResNet-50 layer4 conv2, r = 194) one epoch after a projection:
    # the float32 round-off floor of the residuals used to keep the one-gap bound above the
    # tolerance (an exact fallback on every large layer); the per-vector bound certifies it,
    # and the result is as close to the float64 truth as the tolerance says.
    g = torch.Generator().manual_seed(0)
    rows, cols, r = 512, 4608, 194
    A = torch.randn(rows, cols, generator=g, dtype=F64) / cols**0.5
    # BN rectification's row scales (gamma in [0.1, 2], running_var in [0.2, 5]) spread the
    # spectrum: lam_1 / lam_r about 18, as in the trained ResNet-50.
    a = ((0.1 + 1.9 * torch.rand(rows, 1, generator=g, dtype=F64))
         / (0.2 + 4.8 * torch.rand(rows, 1, generator=g, dtype=F64)).sqrt())
    low = _truncation(top_singular_triplets(A * a, r, "exact"))
    noise = torch.randn(rows, cols, generator=g, dtype=F64)
    M = low + 0.05 * low.norm() / noise.norm() * noise
    t = subspace_triplets(M.float(), r)
    assert t is not None
    truth = _truncation(top_singular_triplets(M, r, "exact"))
    assert (_truncation(t) - truth).norm() / truth.norm() < 1e-5


@pytest.mark.parametrize(("bounds", "steps"), [
    ([5e-6], 1),               # far below tol: accepted at once
    ([3e-4, 9.5e-6], 2),       # below 2/3 of tol: accepted, even while still falling
    ([1.4e-5, 5e-6], 2),       # just below tol while still falling fast: one more step
    ([1.4e-5, 1.3e-5], 2),     # at its round-off floor (no longer falling): accepted
    ([3e-5, 1.4e-5, 1.2e-5], 3),
])
def test_a_bound_just_below_tol_takes_one_more_step_while_it_falls(
        bounds: list[float], steps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from lrpet_lightning.core import linalg

    calls = iter(bounds)
    monkeypatch.setattr(linalg, "ritz_angle_bound", lambda lam, resid, r: next(calls))
    M = _gapped(96, 300, 20).float()
    assert linalg.SUBSPACE_TOL[torch.float32] == 1.5e-5
    assert subspace_triplets(M, 20) is not None
    assert len(list(calls)) == 0 and len(bounds) == steps


def test_a_bound_below_tol_at_the_last_step_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    # Still falling fast, but no step is left: the certified result is kept, not thrown away.
    from lrpet_lightning.core import linalg

    calls = iter([3e-5, 1.4e-5])
    monkeypatch.setattr(linalg, "ritz_angle_bound", lambda lam, resid, r: next(calls))
    assert subspace_triplets(_gapped(96, 300, 20).float(), 20, max_iter=2) is not None
