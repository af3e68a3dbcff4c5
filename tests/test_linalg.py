"""Exact maths of one LRPET projection (docs/method.md: the rank from a ratio, the projection
with energy transfer, the two thin layers) on matrices of known rank.

Everything runs in float64 so that "equal" means equal to ~1e-12, and every expected value
comes from an independent re-implementation written here straight from docs/method.md
(full SVD, rescale, rebuild), never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from lrpet_lightning.core.linalg import (
    BN_INVERSE_EPS,
    ZERO_LAYER_TOL,
    bn_scale,
    factorize_matrix,
    float32_matmul_is_ieee,
    gram_matrix,
    matrix_to_weight,
    numerical_rank,
    project_matrix,
    rank_from_ratio,
    top_singular_triplets,
    weight_to_matrix,
)

F64 = torch.float64
# (rows, cols, r): wide (conv-like, rows < cols), tall, square.
SHAPES = [(16, 48, 5), (40, 12, 3), (24, 24, 7)]


# ----------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random(rows: int, cols: int, seed: int = 0) -> Tensor:
    return torch.randn(rows, cols, generator=_gen(seed), dtype=F64)


def _with_spectrum(rows: int, cols: int, s: Tensor, seed: int = 0) -> Tensor:
    """``U diag(s) V^T`` with random orthonormal ``U``, ``V``: a matrix of known spectrum."""
    g = _gen(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=F64))
    return (U * s) @ V.mT


def _low_rank(rows: int, cols: int, r: int, seed: int = 0) -> Tensor:
    """A random matrix of rank exactly ``r``."""
    g = _gen(seed)
    left = torch.randn(rows, r, generator=g, dtype=F64)
    return left @ torch.randn(r, cols, generator=g, dtype=F64)


def _rank(M: Tensor, rtol: float = 1e-10) -> int:
    s = torch.linalg.svdvals(M)
    return int((s > rtol * s[0]).sum())


def _energy(M: Tensor) -> Tensor:
    return M.square().sum()


def reference_projection(
    M: Tensor, r: int, rho: float = 0.0, energy_transfer: bool = True
) -> Tensor:
    """The projection (docs/method.md), literally: full SVD, rescale, rebuild."""
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    s_new = s.clone()
    if energy_transfer:
        alpha = (s.square().sum() - rho**2 * s[r:].square().sum()) / s[:r].square().sum()
        s_new[:r] = s[:r] * alpha.sqrt()
    s_new[r:] = s[r:] * rho
    return (U * s_new) @ Vh


def reference_rectified(M: Tensor, r: int, a: Tensor, rho: float = 0.0) -> Tensor:
    """The projection with BN rectification: ``diag(a/(a^2+eps1)) @ P(diag(a) @ M)``."""
    a = a.reshape(-1, 1)
    return (a / (a.square() + 1e-5)) * reference_projection(a * M, r, rho)


# ------------------------------------------------------------------------ rank_from_ratio
@pytest.mark.parametrize(
    ("full_rank", "ratio", "min_rank", "expected"),
    [
        (10, 0.3, 1, 3),  # 0.3 * 10 = 2.9999999999999996 in floats: the guard keeps 3
        (100, 0.29, 1, 29),  # 28.999999999999996
        (64, 0.2, 1, 12),
        (16, 0.46, 1, 7),  # ResNet-56 stem at p = 0.54: int(16 - 16 * 0.54) = 7
        (16, 1.0, 1, 16),
        (16, 0.01, 1, 1),  # floor would give 0: min_rank wins
        (16, 0.01, 4, 4),
        (8, 0.5, 16, 8),  # min_rank above the full rank: never above the full rank
    ],
)
def test_rank_from_ratio(full_rank: int, ratio: float, min_rank: int, expected: int) -> None:
    assert rank_from_ratio(full_rank, ratio, min_rank) == expected


def test_rank_from_ratio_recovers_every_exact_fraction() -> None:
    # k / n * n may land a hair below k; every exact fraction must still give k.
    for n in range(1, 129):
        for k in range(1, n + 1):
            assert rank_from_ratio(n, k / n) == k, (n, k)


def test_rank_from_ratio_matches_reference_prun_goal() -> None:
    # The reference code's r = int(n - n * p) equals ours with rank_ratio = 1 - p.
    for n in (16, 32, 64, 256, 512):
        for p in (0.54, 0.80, 0.62, 0.70):
            assert rank_from_ratio(n, round(1 - p, 2)) == int(n - n * p)


# ------------------------------------------------------------------------- bn_scale
def test_bn_scale_with_and_without_gamma() -> None:
    var = torch.tensor([0.5, 2.0, 1e-3], dtype=torch.float32)
    gamma = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float32)
    eps = 1e-5
    expected = torch.tensor([1.5, -0.5, 0.0], dtype=F64) / torch.sqrt(var.double() + eps)
    a = bn_scale(var, eps, gamma)
    assert a.dtype == F64
    assert_close(a, expected)
    assert_close(bn_scale(var, eps, None), 1.0 / torch.sqrt(var.double() + eps))


# ----------------------------------------------------------------- project_matrix maths
@pytest.mark.parametrize(("rows", "cols", "r"), SHAPES)
def test_projection_rank_energy_and_reference(rows: int, cols: int, r: int) -> None:
    M = _random(rows, cols)
    out = project_matrix(M, r).matrix
    assert out.dtype == F64 and out.shape == M.shape
    assert _rank(out) == r
    # Energy transfer with rho = 0 keeps ||M||_F^2 exactly.
    assert_close(_energy(out), _energy(M))
    assert_close(out, reference_projection(M, r))


@pytest.mark.parametrize(("rows", "cols", "r"), SHAPES)
@pytest.mark.parametrize("energy_transfer", [True, False])
def test_projection_with_residual_scale(
    rows: int, cols: int, r: int, energy_transfer: bool
) -> None:
    M = _random(rows, cols, seed=1)
    rho = 0.3
    out = project_matrix(M, r, residual_scale=rho, energy_transfer=energy_transfer).matrix
    assert_close(out, reference_projection(M, r, rho, energy_transfer))
    # The tail is kept (scaled), so the result is full rank again.
    assert _rank(out) == min(rows, cols)
    if energy_transfer:  # alpha accounts for rho: the energy is still preserved
        assert_close(_energy(out), _energy(M))


@pytest.mark.parametrize(("rows", "cols", "r"), SHAPES)
def test_projection_without_energy_transfer_is_plain_truncation(
    rows: int, cols: int, r: int
) -> None:
    M = _random(rows, cols, seed=2)
    out = project_matrix(M, r, energy_transfer=False).matrix
    assert _rank(out) == r
    assert_close(out, reference_projection(M, r, energy_transfer=False))
    # Eckart-Young: the error is exactly the discarded tail.
    s = torch.linalg.svdvals(M)
    assert_close(torch.linalg.matrix_norm(out - M), s[r:].square().sum().sqrt())


@pytest.mark.parametrize(("rows", "cols", "r"), SHAPES)
@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_bn_rectification_formula(rows: int, cols: int, r: int, rho: float) -> None:
    M = _random(rows, cols, seed=3)
    # Scales spanning three decades, both signs (gamma may be negative).
    a = torch.logspace(-1.5, 1.5, rows, dtype=F64) * torch.where(
        torch.arange(rows) % 3 == 0, -1.0, 1.0
    ).to(F64)
    out = project_matrix(M, r, residual_scale=rho, scale=a).matrix
    assert_close(out, reference_rectified(M, r, a, rho))
    if rho == 0.0:  # row scaling does not change the rank
        assert _rank(out) == r


def test_bn_rectification_default_eps_is_the_reference_one() -> None:
    assert BN_INVERSE_EPS == 1e-5


def test_bn_rectification_with_zero_gamma_is_finite() -> None:
    rows, cols, r = 12, 30, 4
    M = _random(rows, cols, seed=4)
    a = torch.linspace(0.5, 2.0, rows, dtype=F64)
    a[2] = 0.0  # a BN with gamma = 0 for channel 2
    out = project_matrix(M, r, scale=a).matrix
    assert torch.isfinite(out).all()
    # The regularized inverse maps a = 0 to 0 instead of dividing by it.
    assert_close(out[2], torch.zeros(cols, dtype=F64))
    assert_close(out, reference_rectified(M, r, a))


def test_kept_energy_relative_change_and_top_value() -> None:
    rows, cols, r = 10, 20, 3
    s = torch.tensor([8.0, 5.0, 4.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1, 0.05], dtype=F64)
    M = _with_spectrum(rows, cols, s)
    result = project_matrix(M, r)
    total, kept = s.square().sum(), s[:r].square().sum()
    assert result.kept_energy == pytest.approx(float(kept / total), rel=1e-12)
    # M' - M = U diag(s' - s) V^T, so the change follows from the spectrum alone.
    s_new = torch.cat([s[:r] * (total / kept).sqrt(), torch.zeros(rows - r, dtype=F64)])
    expected_change = float((s_new - s).norm() / s.norm())
    assert result.relative_change == pytest.approx(expected_change, rel=1e-10)
    assert result.top_singular_value == pytest.approx(8.0, rel=1e-12)


def test_kept_energy_is_measured_on_the_rectified_matrix() -> None:
    M = _random(8, 20, seed=5)
    a = torch.linspace(0.2, 3.0, 8, dtype=F64)
    s = torch.linalg.svdvals(a.reshape(-1, 1) * M)
    result = project_matrix(M, 2, scale=a)
    assert result.kept_energy == pytest.approx(float(s[:2].square().sum() / s.square().sum()))
    expected = reference_rectified(M, 2, a)
    assert result.relative_change == pytest.approx(float((expected - M).norm() / M.norm()))


@pytest.mark.parametrize("svd_method", ["exact", "gram", "randomized"])
def test_all_zero_matrix_is_returned_unchanged(svd_method: str) -> None:
    M = torch.zeros(6, 18, dtype=F64)
    result = project_matrix(M, 2, svd_method=svd_method)
    assert result.top_singular_value < ZERO_LAYER_TOL
    assert torch.equal(result.matrix, M)
    assert result.relative_change == 0.0


def test_tiny_matrix_below_zero_tolerance_is_left_alone() -> None:
    M = 1e-6 * _random(6, 18)
    result = project_matrix(M, 2)
    assert result.top_singular_value < ZERO_LAYER_TOL
    assert torch.equal(result.matrix, M)


# --------------------------------------------------------------------------- back-ends
def _gapped(rows: int, cols: int, r: int) -> Tensor:
    """Well conditioned, with a clear gap after the r-th singular value (5 -> 1)."""
    n = min(rows, cols)
    s = torch.cat([torch.linspace(10, 5, r, dtype=F64), torch.linspace(1, 0.1, n - r, dtype=F64)])
    return _with_spectrum(rows, cols, s, seed=6)


def _rel_err(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize(("rows", "cols"), [(32, 96), (96, 32), (48, 48)])
@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_svd_methods_agree(rows: int, cols: int, rho: float) -> None:
    r = min(rows, cols) // 4
    M = _gapped(rows, cols, r)
    exact = project_matrix(M, r, residual_scale=rho, svd_method="exact").matrix
    assert_close(exact, reference_projection(M, r, rho))
    gram = project_matrix(M, r, residual_scale=rho, svd_method="gram").matrix
    # Measured ~2.5e-15 on these matrices: the Gram eigensolver is exact in float64
    # when the spectrum is well conditioned.
    assert _rel_err(gram, exact) < 1e-10
    # The fast mode: the same Gram eigensolver in float32 (on the float32 matrix).
    gram32 = project_matrix(M.float(), r, residual_scale=rho, svd_method="gram32").matrix
    assert gram32.dtype == torch.float32
    assert _rel_err(gram32.double(), exact) < 1e-5
    # Randomized SVD (4 power iterations) with a 5:1 gap: measured at most 3.3e-8 over
    # 20 seeds on these shapes; 1e-6 leaves a 30x margin. Seeded, so the test is stable.
    torch.manual_seed(0)
    randomized = project_matrix(M, r, residual_scale=rho, svd_method="randomized").matrix
    assert _rel_err(randomized, exact) < 1e-6


@pytest.mark.parametrize("svd_method", ["exact", "gram", "gram32", "randomized"])
def test_top_singular_triplets_values(svd_method: str) -> None:
    rows, cols, r = 20, 50, 4
    M = _gapped(rows, cols, r)
    torch.manual_seed(0)
    # The fast mode is a float32 method: give it float32 and expect float32 accuracy.
    dtype, tol = (torch.float32, 1e-5) if svd_method == "gram32" else (F64, 1e-8)
    U, s, V, energy = top_singular_triplets(M.to(dtype), r, svd_method)  # type: ignore[arg-type]
    assert U.shape == (rows, r) and s.shape == (r,) and V.shape == (cols, r)
    assert U.dtype == s.dtype == V.dtype == energy.dtype == dtype
    assert_close(s.double(), torch.linspace(10, 5, r, dtype=F64), rtol=max(tol, 1e-7), atol=0)
    assert_close(energy.double(), _energy(M), rtol=max(tol, 1e-7), atol=0)
    # Orthonormal columns on both sides.
    assert_close((U.mT @ U).double(), torch.eye(r, dtype=F64), atol=tol, rtol=0)
    assert_close((V.mT @ V).double(), torch.eye(r, dtype=F64), atol=tol, rtol=0)


def test_gram_solves_in_float64_for_float32_input() -> None:
    """"gram" forms and solves the Gram matrix in float64 whatever the input dtype, so a
    float32 weight without a spectral gap (random init, the first projection of a run) is
    projected as exactly as float32 output allows; "gram32" stays in float32."""
    torch.manual_seed(0)
    M = torch.randn(256, 2304) / 48  # Marchenko-Pastur spectrum: no gap at the cut
    r = 97
    truth = project_matrix(M.double(), r, svd_method="exact").matrix
    gram = project_matrix(M, r, svd_method="gram").matrix
    gram32 = project_matrix(M, r, svd_method="gram32").matrix
    exact32 = project_matrix(M, r, svd_method="exact").matrix
    assert gram.dtype == gram32.dtype == torch.float32
    # Measured: gram 3.4e-7 (float32 round-off), float32 full SVD 5.7e-6, gram32 3.9e-6.
    assert _rel_err(gram.double(), truth) < 1e-6
    assert _rel_err(gram.double(), truth) < _rel_err(exact32.double(), truth) / 5
    assert _rel_err(gram32.double(), truth) < 1e-4


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_gram_keeps_its_precision_under_reduced_float32_matmul_precision(precision: str) -> None:
    """torch.set_float32_matmul_precision("high"/"medium") lets float32 products run in TF32
    or bf16 (measured 2.3e-3 relative on this CPU with "medium"); "gram", the exact-quality
    mode, then does its products in float64 and stays at float32 round-off."""
    torch.manual_seed(0)
    M = torch.randn(256, 2304) / 48
    r = 97
    truth = project_matrix(M.double(), r, svd_method="exact").matrix
    torch.set_float32_matmul_precision(precision)
    try:
        assert not float32_matmul_is_ieee(M)
        gram = project_matrix(M, r, svd_method="gram").matrix
    finally:
        torch.set_float32_matmul_precision("highest")
    assert float32_matmul_is_ieee(M)
    assert gram.dtype == torch.float32
    assert _rel_err(gram.double(), truth) < 1e-6


def test_top_singular_triplets_rejects_bad_rank_and_method() -> None:
    M = _random(4, 6)
    with pytest.raises(ValueError, match=r"r must be an int in \[1, 4\] \(kept rank of a 4x6 "
                                         r"matrix\), got 5$"):
        top_singular_triplets(M, 5)
    with pytest.raises(ValueError, match=r"r must be an int in \[1, 4\].*got 0$"):
        top_singular_triplets(M, 0)
    with pytest.raises(TypeError, match=r"r must be an int in \[1, 4\].*got 2\.0$"):
        top_singular_triplets(M, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="svd_method must be one of 'exact', .*got 'foo'$"):
        top_singular_triplets(M, 2, "foo")  # type: ignore[arg-type]


# ------------------------------------------------------------------- decomposition maths
@pytest.mark.parametrize(("rows", "cols", "r"), SHAPES)
def test_factorize_matrix_exact_on_rank_r(rows: int, cols: int, r: int) -> None:
    M = _low_rank(rows, cols, r)
    A, B = factorize_matrix(M, r)
    assert A.shape == (rows, r) and B.shape == (r, cols)
    assert_close(A @ B, M)
    # sqrt(S) on both sides: the two factors carry the same energy.
    assert_close(_energy(A), _energy(B))


def test_factorize_matrix_truncates_to_best_rank_r() -> None:
    M = _random(12, 30, seed=7)
    A, B = factorize_matrix(M, 3)
    assert_close(A @ B, reference_projection(M, 3, energy_transfer=False))


def test_numerical_rank() -> None:
    assert numerical_rank(_low_rank(20, 40, 6), rtol=1e-10) == 6
    assert numerical_rank(torch.zeros(3, 3, dtype=F64), rtol=1e-10) == 1  # "at least 1"


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (8, 4), (5, 2, 7), (4, 2, 3, 3, 3)])
def test_weight_matrix_views_round_trip(shape: tuple[int, ...]) -> None:
    w = torch.randn(shape, dtype=F64)
    M = weight_to_matrix(w)
    assert M.shape == (shape[0], math.prod(shape[1:]))
    assert torch.equal(matrix_to_weight(M, w.shape), w)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        weight_to_matrix(torch.randn(5))


@pytest.mark.parametrize("rows", [1, 7, 255, 256, 257, 1030])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("transposed", [False, True])
def test_gram_matrix_is_the_product_and_exactly_symmetric(rows, dtype, transposed) -> None:
    # From 256 rows only the blocks on and above the diagonal are multiplied; a tall
    # matrix's Gram matrix is that of its transposed view.
    g = torch.Generator().manual_seed(rows)
    A = torch.randn(rows, 90, generator=g, dtype=dtype)
    if transposed:
        A = torch.randn(90, rows, generator=g, dtype=dtype).mT
    G = gram_matrix(A)
    assert G.dtype == dtype and G.shape == (rows, rows)
    assert torch.equal(G, G.mT)
    expected = (A.double() @ A.double().mT)
    tol = 1e-12 if dtype == F64 else 2e-6
    assert (G.double() - expected).abs().max() <= tol * expected.abs().max()
