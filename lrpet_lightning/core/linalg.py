"""Tensor maths of LRPET: pure functions on tensors, no modules, no state.

Everything here follows docs/method.md (a layer as a matrix, the projection with energy
transfer, the two thin layers):

* a layer's weight is viewed as a matrix ``M`` with one row per output channel;
* the rank kept is ``max(min_rank, floor(rank_ratio * min(rows, cols)))``;
* one projection optionally rectifies ``M`` by the following BatchNorm
  (``Mb = diag(a) M`` with ``a = gamma / sqrt(running_var + eps)``), truncates ``Mb``
  to rank ``r`` with energy transfer, and undoes the rectification with the reference
  code's regularized inverse ``diag(a / (a**2 + eps1))``.

Only the top-``r`` singular triplets are ever needed: the total energy is
``||Mb||_F**2`` and the discarded tail ``Mb - U_r S_r V_r^T`` is a difference of two
matrices we already have. That is what lets the faster back-ends (Gram eigensolver,
randomized SVD) compute exactly the same projection as a full SVD.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lrpet_lightning.core.checks import check_choice, check_float, check_int

__all__ = [
    "BN_INVERSE_EPS",
    "SUBSPACE_MAX_ITER",
    "SUBSPACE_OVERSAMPLE",
    "SUBSPACE_SEED",
    "SUBSPACE_TOL",
    "SVD_METHODS",
    "ZERO_LAYER_TOL",
    "ProjectionResult",
    "all_finite",
    "bn_scale",
    "factorization_pays",
    "factorize_matrix",
    "float32_matmul_is_ieee",
    "gram_matrix",
    "matrix_to_weight",
    "numerical_rank",
    "project_matrix",
    "rank_from_ratio",
    "ritz_angle_bound",
    "round_rank",
    "subspace_triplets",
    "top_singular_triplets",
    "weight_to_matrix",
]

#: ``eps1`` of the regularized inverse that undoes BN rectification (reference code).
BN_INVERSE_EPS = 1e-5
#: A layer whose largest singular value is below this is all-zero and left alone.
ZERO_LAYER_TOL = 1e-4
#: Names accepted by ``svd_method``.
SVD_METHODS = ("exact", "gram", "gram32", "randomized", "subspace")
#: ``"subspace"`` accepts its top-r subspace when the bound on ``sin(angle)`` to the true one
#: (:func:`ritz_angle_bound`) is below this, per dtype. In float32 the round-off floor of
#: the bound on trained ResNet-50 convs is 4e-6 to 1.5e-5 (2048x1024: 1.46e-5).
SUBSPACE_TOL = {torch.float32: 1.5e-5, torch.float64: 1e-9}
#: ``"subspace"``: block columns beyond ``r`` (speed of convergence) and most iterations.
SUBSPACE_OVERSAMPLE = 8
SUBSPACE_MAX_ITER = 8
#: Seed of ``"subspace"``'s start block, drawn from a local generator: the result depends
#: only on the matrix, and the global RNG is untouched.
SUBSPACE_SEED = 0

SvdMethod = Literal["exact", "gram", "gram32", "randomized", "subspace"]


#: ``gram_matrix`` splits a matrix of at least this many rows into ``GRAM_BLOCKS`` row
#: blocks and computes only the products on and above the diagonal.
GRAM_BLOCKED_ROWS = 256
GRAM_BLOCKS = 4


def gram_matrix(A: Tensor) -> Tensor:
    """``A @ A.mT``, exactly symmetric. From ``GRAM_BLOCKED_ROWS`` rows on, only the row
    blocks on and above the diagonal are multiplied (5/8 of the arithmetic with 4 blocks)
    and the rest is mirrored: measured, 1 thread, 0.64-0.76 of the time of one product
    for the ResNet-50 conv shapes (256 to 1024 rows; no gain below).

    >>> A = torch.randn(300, 40, dtype=torch.float64)
    >>> torch.allclose(gram_matrix(A), A @ A.mT)
    True
    """
    n = A.shape[0]
    if n < GRAM_BLOCKED_ROWS:
        return A @ A.mT
    edges = [round(i * n / GRAM_BLOCKS) for i in range(GRAM_BLOCKS + 1)]
    G = A.new_empty(n, n)
    for start, stop in itertools.pairwise(edges):
        block = A[start:stop] @ A[start:].mT  # this block row, from the diagonal on
        G[start:stop, start:] = block
        G[stop:, start:stop] = block[:, stop - start:].mT
    return G


# --------------------------------------------------------------------------- views
def weight_to_matrix(weight: Tensor) -> Tensor:
    """View a Conv/Linear weight ``(N, C, *kernel)`` / ``(out, in)`` as ``(N, C*prod(kernel))``."""
    if weight.dim() < 2:
        raise ValueError("weight must have at least 2 dimensions (out, in, *kernel), got "
                         f"shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def matrix_to_weight(matrix: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`weight_to_matrix`."""
    return matrix.reshape(shape)


# --------------------------------------------------------------------------- ranks
def rank_from_ratio(full_rank: int, rank_ratio: float, min_rank: int = 1,
                    rank_multiple: int = 1) -> int:
    """Rank kept for a layer of full rank ``full_rank`` (docs/method.md).

    ``r = max(min_rank, floor(rank_ratio * full_rank))``, never above ``full_rank``, then
    rounded by :func:`round_rank` to a multiple of ``rank_multiple`` (1: no rounding).
    The ``1e-9`` guards the floor against float error (``0.3 * 10 = 2.9999...``).

    Example:
        >>> rank_from_ratio(64, 0.2)
        12
        >>> rank_from_ratio(10, 0.3)  # not 2: 0.3 * 10 is 2.9999... in floats
        3
        >>> rank_from_ratio(256, 0.38, rank_multiple=8)  # 97 -> 96
        96
    """
    r = min(max(int(min_rank), math.floor(rank_ratio * full_rank + 1e-9)), full_rank)
    return round_rank(r, full_rank, rank_multiple, min_rank)


def round_rank(rank: int, full_rank: int, rank_multiple: int = 1, min_rank: int = 1) -> int:
    """``rank`` rounded to the nearest allowed rank: a multiple of ``rank_multiple`` below
    ``full_rank``, or ``full_rank`` itself (the layer stays dense, so it adds no new
    width), and at least ``min(min_rank, full_rank)``. Ties round up (more rank kept).

    So a layer whose full rank is below ``rank_multiple`` keeps its full rank, and one
    whose full rank is not a multiple may round up to it when that is the nearest.

    Example:
        >>> [round_rank(r, 64, 8) for r in (1, 4, 11, 12, 61)]
        [8, 8, 8, 16, 64]
        >>> round_rank(3, 6, 8), round_rank(9, 20, 8), round_rank(19, 20, 8)
        (6, 8, 20)
    """
    if rank_multiple <= 1 or rank >= full_rank:
        return rank
    low = max(min(int(min_rank), full_rank), 1)
    below = max(rank // rank_multiple * rank_multiple, rank_multiple)  # a multiple <= rank
    above = below + rank_multiple if below < rank else below
    candidates = [c for c in (below, above) if c < full_rank] + [full_rank]
    candidates = [c for c in candidates if c >= low] or [full_rank]
    # the nearest; ties (and the floor at min_rank) go up
    return min(candidates, key=lambda c: (abs(c - rank), -c))


def factorization_pays(rows: int, cols: int, rank: int) -> bool:
    """Whether a ``rows x cols`` weight matrix at ``rank`` has fewer parameters as two thin
    layers than dense: ``rank * (rows + cols) < rows * cols``. ``decompose_`` keeps a layer
    dense where it does not pay, and the budget solvers price it so.

    Example:
        >>> factorization_pays(64, 576, 32), factorization_pays(64, 64, 32)
        (True, False)
    """
    return rank * (rows + cols) < rows * cols


def all_finite(t: Tensor) -> bool:
    """No NaN/Inf in ``t``, in one pass: a NaN or Inf makes the sum NaN/Inf. (A sum of
    finite values overflows only past the dtype's largest value, where the energy would
    overflow too.) Ten times cheaper than ``torch.isfinite(t).all()`` on CPU."""
    return bool(torch.isfinite(t.sum()))


def bn_scale(
    running_var: Tensor, eps: float, weight: Tensor | None = None
) -> Tensor:
    """Per-channel scale ``a = gamma / sqrt(running_var + eps)`` a BatchNorm applies.

    ``weight`` is the BN's ``gamma``; ``None`` (a BN without affine) means ``gamma = 1``.
    """
    a = torch.rsqrt(running_var.to(torch.float64) + eps)
    if weight is not None:
        a = a * weight.to(torch.float64)
    return a


# ------------------------------------------------------------------------ SVD back-ends
class Triplets(NamedTuple):
    """Top-``r`` singular triplets ``M ~ U diag(s) V^T`` and the total energy ``||M||_F**2``."""

    U: Tensor  # (rows, r)
    s: Tensor  # (r,), descending
    V: Tensor  # (cols, r)
    energy: Tensor  # scalar


def top_singular_triplets(
    M: Tensor, r: int, method: SvdMethod = "exact", *, niter: int = 4, oversample: int = 8
) -> Triplets:
    """The top ``r`` singular triplets of ``M`` and ``||M||_F**2``.

    Args:
        M: a 2-D floating matrix (float32 or float64); the triplets come back in its dtype.
        r: how many triplets, ``1 <= r <= min(M.shape)``.
        method: ``"exact"`` — full ``torch.linalg.svd`` in ``M.dtype`` (the reference
            code's way); ``"gram"`` — symmetric eigensolver on the smaller Gram matrix
            ``M M^T`` or ``M^T M``, formed and solved in float64 whatever ``M.dtype`` (exact
            to round-off, several times faster than a full SVD on CPU); ``"gram32"`` — the
            same in ``M.dtype`` (the fast mode: about 1.4x faster again on CPU, error about
            1e-5 of the weights where the spectrum has no gap at the cut, far less once
            training has been projected); ``"randomized"`` — ``torch.svd_lowrank`` with
            ``niter`` power iterations; ``"subspace"`` — :func:`subspace_triplets`, a top-r
            block subspace iteration in ``M.dtype`` with a convergence check, falling back
            to ``"gram"`` where it is not certified (no gap at the cut: random init).
        niter, oversample: randomized SVD's power iterations and oversampling.

    The triplets' accuracy is that of the method; ``energy`` is summed in float64 for
    ``"gram"`` and returned, like the triplets, in ``M.dtype``.
    """
    rows, cols = M.shape
    n = min(rows, cols)
    check_int("r", r, minimum=1, maximum=n, meaning=f"kept rank of a {rows}x{cols} matrix")
    check_choice("svd_method", method, SVD_METHODS)
    if method == "exact":
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        return Triplets(U[:, :r], s[:r], Vh[:r].mT, M.square().sum())
    if method in ("gram", "gram32"):
        # Eigen-decompose the smaller Gram matrix; eigh returns ascending eigenvalues.
        wide = rows <= cols
        Mg = M.double() if method == "gram" else M
        G = gram_matrix(Mg if wide else Mg.mT)
        evals, evecs = torch.linalg.eigh(G)
        energy = G.diagonal().sum()  # = ||M||_F**2
        s = evals[-r:].flip(0).clamp_min(0).sqrt()
        evecs = evecs[:, -r:].flip(1).to(M.dtype)
        # The other side's vectors: V = M^T U / s (or U = M V / s), in M's dtype: only the
        # rebuild uses them, and U diag(s) V^T = U U^T M whatever their accuracy. A zero
        # singular value leaves a zero column, which is harmless: its triplet adds nothing.
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s)).to(M.dtype)
        if wide:
            U, V = evecs, (M.mT @ evecs) * inv
        else:
            U, V = (M @ evecs) * inv, evecs
        return Triplets(U, s.to(M.dtype), V, energy.to(M.dtype))
    if method == "subspace":
        found = subspace_triplets(M, r)
        # Not converged (no gap at the cut, e.g. random init), or r close to n: the exact
        # path. A zero or rank-deficient matrix has no gap either and lands here.
        return found if found is not None else top_singular_triplets(M, r, "gram")
    # "randomized"
    q = min(r + oversample, n)
    U, s, V = torch.svd_lowrank(M, q=q, niter=niter)
    return Triplets(U[:, :r], s[:r], V[:, :r], M.square().sum())


def subspace_triplets(
    M: Tensor,
    r: int,
    *,
    tol: float | None = None,
    max_iter: int = SUBSPACE_MAX_ITER,
    oversample: int = SUBSPACE_OVERSAMPLE,
    seed: int = SUBSPACE_SEED,
) -> Triplets | None:
    """The top ``r`` singular triplets by block subspace iteration, or ``None`` when they
    cannot be certified — the caller then takes an exact path (``svd_method="subspace"``).

    Subspace iteration with Rayleigh–Ritz on ``S = A A^T``, ``A`` the matrix with its
    smaller side first (``n = min(rows, cols)``), with a block of ``k = r + oversample``
    columns started from ``S`` applied to a seeded random block (a local generator on the
    CPU: the result depends only on ``M``, is bit-identical between calls on one device and
    leaves the global RNG alone). ``S`` is formed once (``rows*cols*n``, one fast matrix
    product) when the block is wider than ``n / 8``; a narrower block applies ``A (A^T X)``
    instead, two products of ``rows*cols*k`` per step. Either way there is no eigensolver of
    size ``n``: only a QR of the ``n x k`` block per step and one ``k x k`` eigensolver per
    check. Each step shrinks the error by ``lambda_{k+1} / lambda_r = (s_{k+1}/s_r)**2``,
    so a spectrum with a gap at the cut (every projection after the first: each weight is
    then rank ``r`` plus one epoch's change) converges in two or three steps.

    Convergence check (after every step): the Ritz pairs' residuals bound the angle to the
    true top-``r`` eigenvectors of ``S`` (:func:`ritz_angle_bound`). The projected matrix
    ``U U^T A`` is then within about ``2 ||sin Theta||_F`` of the exact rank-``r``
    truncation, relative to ``||A||_F``. The triplets are returned only when the bound is
    below ``tol``; when the bound, shrinking at the observed rate, cannot reach ``tol``
    within ``max_iter`` steps (no gap at the cut), the iteration stops at once.

    Args:
        M: a 2-D float32 or float64 matrix, on any device; the maths runs in its dtype.
        r: how many triplets, ``1 <= r <= min(M.shape)``.
        tol: the accepted bound on ``||sin Theta||_F``; default ``SUBSPACE_TOL[M.dtype]``.
        max_iter: most subspace steps.
        oversample: block columns beyond ``r``.
        seed: seed of the start block.

    Returns:
        The :class:`Triplets` (``energy = ||M||_F**2``), or ``None`` when not converged, when
        ``r + oversample > n / 2`` (a full eigensolver costs no more) or for other dtypes.
    """
    rows, cols = M.shape
    n = min(rows, cols)
    check_int("r", r, minimum=1, maximum=n, meaning=f"kept rank of a {rows}x{cols} matrix")
    if M.dtype not in SUBSPACE_TOL:
        return None
    k = r + oversample
    if 2 * k > n:
        return None
    tol = SUBSPACE_TOL[M.dtype] if tol is None else tol
    wide = rows <= cols
    A = M if wide else M.mT
    if 8 * k >= n:
        S = gram_matrix(A)
        energy = S.diagonal().sum(dtype=torch.float64)

        def apply(X: Tensor) -> Tensor:
            return S @ X
    else:
        energy = A.square().sum(dtype=torch.float64)

        def apply(X: Tensor) -> Tensor:
            return A @ (A.mT @ X)

    generator = torch.Generator().manual_seed(seed)
    start = torch.rand(n, k, generator=generator, dtype=M.dtype) - 0.5
    # S^2 applied to the start before the first QR: one step from a random start is never
    # enough, and float32 holds the top-r directions of S^2 X to ~eps*(s_1/s_r)**4.
    Y = apply(apply(start.to(M.device)))
    bound = math.inf
    for step in range(1, max_iter + 1):
        Q = torch.linalg.qr(Y).Q
        Y = apply(Q)
        # Rayleigh-Ritz: the eigenpairs of Q^T S Q (k x k, in float64), descending.
        T = (Q.mT @ Y).double()
        lam, W = torch.linalg.eigh((T + T.mT) / 2)
        lam, W = lam.flip(0), W.flip(1).to(M.dtype)
        U, Y = Q @ W, Y @ W  # Ritz vectors and S applied to them (the next step's block)
        resid = (Y[:, : r + 1] - U[:, : r + 1] * lam[: r + 1].to(M.dtype)).double()
        last, bound = bound, ritz_angle_bound(lam, torch.linalg.vector_norm(resid, dim=0), r)
        # Between 2/3 of tol and tol, one more step while the bound still falls fast (it
        # then sits well above its round-off floor): accepted at the first step just under
        # 1.5e-5, a trained ResNet-50 conv was 1.0e-5 off, against 4e-6 one step later.
        # (Below tol/2 instead of 2/3 of tol, the 11 largest convs of a trained ResNet-50
        # took a third step from ~8e-6 that left them at their floor, ~8e-6: 14 % of the pass.)
        if bound <= tol and (bound <= tol * 2 / 3 or step == max_iter
                             or (math.isfinite(last) and bound > last / 2)):
            break
        if not math.isfinite(bound):  # no gap at all (repeated or zero singular values)
            return None
        # The error shrinks by about lam_{k+1}/lam_r per step (then: bound / last); give
        # up when the steps left cannot reach tol — no gap at the cut, or round-off floor.
        rate = bound / last if math.isfinite(last) else float(lam[k - 1] / lam[r - 1])
        if bound * min(rate, 1.0) ** (max_iter - step) > tol:
            return None
    else:
        return None
    s = lam[:r].clamp_min(0).sqrt()
    U = U[:, :r]
    # The other side's vectors, as in "gram": U diag(s) V^T = U U^T A whatever their accuracy.
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s)).to(M.dtype)
    V = (A.mT @ U) * inv
    s, energy = s.to(M.dtype), energy.to(M.dtype)
    return Triplets(U, s, V, energy) if wide else Triplets(V, s, U, energy)


def ritz_angle_bound(lam: Tensor, resid: Tensor, r: int) -> float:
    """A bound on ``||sin Theta||_F`` (assuming the block holds the top ``r + 1``
    directions, see below) between the top-``r`` Ritz vectors ``u_i`` of a
    symmetric ``S`` and its true top-``r`` eigenvectors, from the Ritz values ``lam``
    (descending, at least ``r + 1``) and the residual norms ``resid[i] = ||S u_i - lam_i u_i||``.

    Each vector on its own (Davis–Kahan for one vector): with ``P`` the projector onto the
    eigenvectors of ``S`` beyond the ``r``-th, whose eigenvalues are at most ``lam_{r+1}``,
    ``||P u_i|| <= resid_i / (lam_i - lam_{r+1})`` — ``P`` commutes with ``S``, so
    ``||P (S - lam_i) u_i|| >= (lam_i - lam_{r+1}) ||P u_i||``. And since the ``u_i`` are
    orthonormal, ``||sin Theta||_F**2 = sum_i ||P u_i||**2``. The true ``lam_{r+1}`` is
    estimated from above by the ``(r+1)``-th Ritz value plus its residual (the standard Ritz
    estimate: it assumes the block holds the top ``r+1`` directions, which an oversampled
    random start makes overwhelmingly likely; a direction the block misses entirely leaves
    no residual, so a matrix built against the seed can defeat it). Tighter than the one-gap form
    ``||R||_F / (lam_r - lam_{r+1})`` by the spread of the kept eigenvalues: in float32,
    where the residuals are round-off of about the same size for every vector, 2-4x on
    trained ResNet-50 weights, and within 1.3x of the true angle there.

    ``inf`` when some kept Ritz value does not clear the estimate (no gap at the cut).

    >>> lam = torch.tensor([4.0, 2.0, 1.0])
    >>> round(ritz_angle_bound(lam, torch.tensor([0.1, 0.1, 0.0]), 2), 4)  # 0.1/3, 0.1/1
    0.1054
    """
    lam, resid = lam.double(), resid.double()
    gaps = lam[:r] - (lam[r] + resid[r])
    if not bool((gaps > 0).all()):
        return math.inf
    return float(torch.linalg.vector_norm(resid[:r] / gaps))


def float32_matmul_is_ieee(t: Tensor) -> bool:
    """Whether float32 matrix products on ``t``'s device run in IEEE float32, not in TF32 or
    bf16 (which ``torch.set_float32_matmul_precision("high"/"medium")`` or the backends'
    ``fp32_precision`` allow; about 1e-3 relative). Reads the per-backend settings, which
    works whichever API (legacy or new) set them."""
    backend = torch.backends.cuda.matmul if t.is_cuda else torch.backends.mkldnn.matmul
    precision = getattr(backend, "fp32_precision", None)
    if precision is None:  # torch without the per-backend API
        return torch.get_float32_matmul_precision() == "highest"
    if precision == "none":  # inherits the generic setting
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision in ("none", "ieee")


# ----------------------------------------------------------------------- projection
@dataclass(frozen=True)
class ProjectionResult:
    """The projected matrix and what the projection did (values are Python floats)."""

    matrix: Tensor
    #: Fraction of the (rectified) energy held by the top-r singular values, before transfer.
    kept_energy: float
    #: ``||M' - M||_F / ||M||_F`` of the unrectified weight matrix.
    relative_change: float
    #: Largest singular value of the (rectified) matrix.
    top_singular_value: float


def project_matrix(
    M: Tensor,
    r: int,
    *,
    energy_transfer: bool = True,
    residual_scale: float = 0.0,
    scale: Tensor | None = None,
    svd_method: SvdMethod = "exact",
    bn_inverse_eps: float = BN_INVERSE_EPS,
) -> ProjectionResult:
    """One LRPET projection of one weight matrix (docs/method.md), out of place.

    Args:
        M: ``(rows, cols)`` floating matrix; the maths runs in its dtype (pass float32/64).
        r: kept rank, ``1 <= r <= min(rows, cols)``.
        energy_transfer: rescale the kept singular values so that the energy
            ``||Mb||_F**2`` is preserved.
        residual_scale: ``rho`` — the discarded singular values are multiplied by it
            (reference code: ``redu_fac``); ``0`` gives an exactly rank-``r`` result.
        scale: BN rectification scale ``a`` (one value per row) or ``None`` for none.
        svd_method: see :func:`top_singular_triplets`.
        bn_inverse_eps: ``eps1`` of the regularized inverse ``a / (a**2 + eps1)``.

    Returns:
        A :class:`ProjectionResult`. Its ``matrix`` is ``M`` unchanged (same values) when
        the largest singular value is below ``ZERO_LAYER_TOL`` — callers treat that as skip.
    """
    rho = check_float("residual_scale", residual_scale, low=0, high=1,
                      meaning="factor on the discarded singular values")
    given = M
    if (svd_method in ("gram", "subspace") and M.dtype != torch.float64
            and not float32_matmul_is_ieee(M)):
        # TF32 / bf16 float32 matmuls (torch.set_float32_matmul_precision("high"/"medium"))
        # are ~1e-3 off: the exact-quality mode then does its products in float64.
        M = M.double()
    a = None
    if scale is not None:
        a = scale.to(M.dtype).reshape(-1, 1)
    Mb = M * a if a is not None else M
    U, s, V, energy = top_singular_triplets(Mb, r, svd_method)
    top = float(s[0]) if s.numel() else 0.0
    if top < ZERO_LAYER_TOL:
        return ProjectionResult(given, 1.0, 0.0, top)

    kept = s.square().sum()
    tail = (energy - kept).clamp_min(0)  # float error can make it slightly negative
    if energy_transfer:
        alpha = (energy - rho**2 * tail) / kept
        s_new = s * alpha.sqrt()
    else:
        s_new = s
    # Mb' = U diag(s_new) V^T + rho * (Mb - U diag(s) V^T): the tail scaled by rho,
    # written with the top-r triplets only.
    low_rank = (U * (s_new - rho * s)) @ V.mT
    Mb_new = low_rank + rho * Mb if rho != 0.0 else low_rank
    if a is not None:
        M_new = Mb_new * (a / (a.square() + bn_inverse_eps))
    else:
        M_new = Mb_new
    norm = torch.linalg.matrix_norm(M)
    change = float(torch.linalg.matrix_norm(M_new - M) / norm) if norm > 0 else 0.0
    return ProjectionResult(M_new.to(given.dtype), float(kept / energy), change, top)


# ----------------------------------------------------------------- decomposition maths
def numerical_rank(M: Tensor, rtol: float) -> int:
    """Number of singular values above ``rtol * s_max`` (at least 1)."""
    check_float("rtol", rtol, low=0, high=1, low_open=True, high_open=True,
                meaning="relative to the largest singular value")
    s = torch.linalg.svdvals(M)
    return max(1, int((s > rtol * s[0]).sum()))


#: ``decompose_`` (and a factorized layer loading a dense weight) warns about a layer whose
#: truncation changes its weight by more than this (relative Frobenius norm): it was not
#: (close to) rank r, so the model's outputs change.
TRUNCATION_RTOL = 1e-3


def factorize_matrix(M: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Split ``M ~ A @ B`` with ``A = U_r sqrt(S_r)`` ``(rows, r)`` and ``B = sqrt(S_r) V_r^T``.

    Exact when ``M`` has rank ``r`` (docs/method.md); otherwise the best rank-``r``
    approximation. The square root splits the scale evenly between the two thin layers.
    """
    # The top-r triplets from the Gram matrix: an order of magnitude faster than a full SVD
    # on CPU and, in float64, exact to round-off for the triplets that carry the weight.
    U, s, V, _ = top_singular_triplets(M.double(), r, "gram")
    root = s.sqrt()
    return (U * root).to(M.dtype), (root.unsqueeze(1) * V.mT).to(M.dtype)
