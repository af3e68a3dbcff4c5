"""Module transforms: one LRPET projection of a model, and decomposition into thin layers."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.factorized import FactorizedLayer, factorized_type
from lrpet_lightning.core.linalg import (
    ZERO_LAYER_TOL,
    ProjectionResult,
    bn_scale,
    numerical_rank,
    project_matrix,
)
from lrpet_lightning.core.plan import plan_layers
from lrpet_lightning.core.trace import attach_bn_pairs
from lrpet_lightning.core.walk import TargetLayer, layer_matrix

__all__ = [
    "LayerRecord",
    "attach_bn_pairs",
    "decompose_",
    "decomposed_ranks",
    "match_architecture_",
    "project_layers_",
    "project_low_rank_",
    "recompose_",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerRecord:
    """What one projection did to one layer."""

    name: str
    rank: int
    full_rank: int
    #: Energy fraction held by the top-``rank`` singular values, before energy transfer.
    kept_energy: float
    #: ``||W' - W||_F / ||W||_F``.
    relative_change: float
    bn_rectified: bool
    #: Why the layer was left unchanged, or None when it was projected.
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rectification_scale(layer: TargetLayer) -> torch.Tensor | None:
    bn = layer.bn
    if bn is None or bn.running_var is None:  # no BN, or a BN without running stats
        return None
    return bn_scale(bn.running_var, bn.eps, bn.weight if bn.affine else None)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``, in one pass: a NaN or Inf makes the sum NaN/Inf. (A sum of
    finite values overflows only past the dtype's largest value, where the energy would
    overflow too.) Ten times cheaper than ``torch.isfinite(t).all()`` on CPU."""
    return bool(torch.isfinite(t.sum()))


def _project_with_fallbacks(
    M: torch.Tensor, rank: int, scale: torch.Tensor | None, config: LowRankConfig
) -> ProjectionResult:
    """Project; when the solver fails, retry with a full SVD in float64, then on the CPU."""
    attempts = [(M, config.svd_method)]
    if M.dtype != torch.float64 or config.svd_method != "exact":
        attempts.append((M.double(), "exact"))
    if M.device.type != "cpu":
        attempts.append((M.double().cpu(), "exact"))
    error: Exception | None = None
    for matrix, method in attempts:
        try:
            result = project_matrix(
                matrix, rank, energy_transfer=config.energy_transfer,
                residual_scale=config.residual_scale,
                scale=None if scale is None else scale.to(matrix.device),
                svd_method=method,  # type: ignore[arg-type]
            )
        except (torch.linalg.LinAlgError, RuntimeError) as err:
            error = err
            continue
        if _all_finite(result.matrix):
            return result
        error = FloatingPointError("projection produced NaN/Inf")
    raise RuntimeError(f"SVD failed after {len(attempts)} attempts: {error}")


def _is_zero(M: torch.Tensor) -> bool:
    """The reference code's all-zero test, on the raw weight (never the BN-rectified one: a
    BatchNorm with gamma = 0 would hide a non-zero weight): largest singular value below
    ``ZERO_LAYER_TOL``. ``||M||_2 <= ||M||_F``, so the Frobenius norm decides most cases."""
    norm = float(torch.linalg.matrix_norm(M))
    if norm < ZERO_LAYER_TOL:
        return True
    return norm < ZERO_LAYER_TOL * min(M.shape) ** 0.5 and float(
        torch.linalg.matrix_norm(M.double(), ord=2)) < ZERO_LAYER_TOL


@torch.no_grad()
def project_layers_(layers: Sequence[TargetLayer], config: LowRankConfig) -> list[LayerRecord]:
    """Project every layer of ``layers`` in place (the workhorse of ``project_low_rank_``).

    Transactional: every layer's new weight is computed first and all are written at the
    end, so an interruption (Ctrl-C, a crash) leaves the model as it was, never half
    projected. Each weight is written into its existing Parameter (``copy_``), in the
    parameter's dtype, so optimizers, DDP buckets and ``torch.compile`` keep seeing it. A
    layer that cannot be projected (NaN/Inf, all-zero, SVD failure) is left unchanged,
    reported in its record, and — for faults — warned about; the others go on. A layer
    whose BatchNorm scales every channel to ~0 (gamma = 0, e.g. a zero-initialized last BN
    of a residual block) is projected without BN rectification.
    """
    meta = [layer.name for layer in layers if layer.module.weight.is_meta]
    if meta:
        raise ValueError(
            f"cannot project layers whose weights are on the meta device (no values): "
            f"{', '.join(meta[:4])}{', ...' if len(meta) > 4 else ''}; materialize the model "
            "first (e.g. model.to_empty(device='cpu') and initialize it)")
    records = []
    writes: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in layers:
        weight = layer.module.weight
        # float32 maths (float64 for float64 weights); "gram" forms and solves its Gram
        # matrix in float64 itself, the one step that needs it.
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        M = layer.matrix().to(compute)
        scale = _rectification_scale(layer) if config.bn_rectification else None
        record = dict(name=layer.name, rank=layer.rank, full_rank=layer.full_rank,
                      bn_rectified=scale is not None)

        if layer.rank >= layer.full_rank:
            records.append(LayerRecord(**record, kept_energy=1.0, relative_change=0.0,
                                       skipped="rank >= full rank"))
            continue
        if not _all_finite(M) or (scale is not None and not _all_finite(scale)):
            warnings.warn(f"LRPET: {layer.name} has NaN/Inf weights or BN statistics; "
                          "its projection is skipped", RuntimeWarning, stacklevel=2)
            records.append(LayerRecord(**record, kept_energy=float("nan"),
                                       relative_change=0.0, skipped="non-finite values"))
            continue
        if _is_zero(M):
            records.append(LayerRecord(**record, kept_energy=1.0, relative_change=0.0,
                                       skipped="all-zero layer"))
            continue
        try:
            result = _project_with_fallbacks(M, layer.rank, scale, config)
            if scale is not None and result.top_singular_value < ZERO_LAYER_TOL:
                # The BatchNorm zeroes every channel (gamma = 0): its view of the weight
                # says nothing, so project the weight itself.
                record["bn_rectified"] = False
                result = _project_with_fallbacks(M, layer.rank, None, config)
        except RuntimeError as err:
            warnings.warn(f"LRPET: projection of {layer.name} failed and is skipped: {err}",
                          RuntimeWarning, stacklevel=2)
            records.append(LayerRecord(**record, kept_energy=float("nan"),
                                       relative_change=0.0, skipped=f"SVD failed: {err}"))
            continue
        writes.append((weight, layer.weight_from_matrix(result.matrix).to(weight)))
        records.append(LayerRecord(**record, kept_energy=result.kept_energy,
                                   relative_change=result.relative_change))
    for weight, new in writes:  # all at once: never a half-projected model
        weight.copy_(new)
    return records


def project_low_rank_(
    model: nn.Module,
    *,
    rank_ratio: float | None = None,
    ranks: Mapping[str, float | int] | None = None,
    energy_transfer: bool = True,
    residual_scale: float = 0.0,
    bn_rectification: bool = True,
    include_linear: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    example_inputs: Any = None,
    min_rank: int = 1,
    svd_method: str = "gram",
    target_flops_reduction: float | None = None,
    target_params_reduction: float | None = None,
    allocation: str = "uniform",
) -> list[LayerRecord]:
    """One LRPET projection of every targeted layer of ``model``, in place.

    Each Conv (groups=1; and each Linear with ``include_linear=True``) is projected onto
    rank ``r`` by truncated SVD with energy transfer and BN rectification
    (ALGORITHM.md §4). The BatchNorm following each conv is found by one forward pass on
    ``example_inputs`` (eval mode, no grad); without ``example_inputs`` BN rectification
    is skipped with a warning.

    Args:
        model: any ``nn.Module``.
        rank_ratio: kept fraction of each layer's full rank ``min(rows, cols)``, in (0, 1].
        ranks: ``{module-name pattern: ratio (float) or rank (int)}`` overrides.
        energy_transfer: keep each matrix's Frobenius energy.
        residual_scale: factor on the discarded singular values, in [0, 1].
        bn_rectification: project as the following BatchNorm sees the conv.
        include_linear: also project ``nn.Linear`` layers.
        include, exclude: glob patterns on qualified module names.
        example_inputs: a tensor (or tuple of args / dict of kwargs) for the BN tracing pass.
        min_rank: smallest rank kept.
        svd_method: ``"gram"`` (default; float64 eigensolver on the Gram matrix — exact
            to round-off and about 3x faster than a full SVD on CPU), ``"gram32"`` (the
            fast mode: the same in float32), ``"exact"`` (full ``torch.linalg.svd``) or
            ``"randomized"``.
        target_flops_reduction, target_params_reduction: a budget instead of
            ``rank_ratio`` — the fraction of FLOPs (needs ``example_inputs``) or parameters
            the decomposed model sheds, in (0, 1); the ranks are solved by
            :func:`~lrpet_lightning.core.budget.solve_ranks` on every call (for repeated
            projections solve once and pass ``ranks=solution.ranks``).
        allocation: ``"uniform"`` or ``"spectrum"``, how a budget is shared by the layers.

    Returns:
        One :class:`LayerRecord` per targeted layer.

    Raises:
        ValueError, TypeError: a bad argument (named in the message).

    Example:
        >>> records = project_low_rank_(model, rank_ratio=0.25, example_inputs=x)
    """
    config = LowRankConfig(
        rank_ratio=rank_ratio, ranks=ranks, energy_transfer=energy_transfer,
        residual_scale=residual_scale, bn_rectification=bn_rectification,
        include_linear=include_linear, include=include, exclude=exclude,
        min_rank=min_rank, svd_method=svd_method, target_flops_reduction=target_flops_reduction,
        target_params_reduction=target_params_reduction, allocation=allocation,
    )
    if bn_rectification and example_inputs is None:
        warnings.warn(
            "project_low_rank_: bn_rectification=True but example_inputs is None, so the "
            "BatchNorm after each conv cannot be traced; BN rectification is skipped. "
            "Pass example_inputs (one input batch) or bn_rectification=False.",
            UserWarning, stacklevel=2,
        )
    plan = plan_layers(model, config, example_inputs)
    plan.warn("project_low_rank_")
    return project_layers_(plan.layers, config)


# ------------------------------------------------------------------------ decomposition
def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Register ``module`` as ``model``'s submodule ``name`` (a dotted path)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _saves_parameters(layer: TargetLayer, rank: int) -> bool:
    rows, cols = layer.matrix().shape
    return rank * (rows + cols) < rows * cols


#: ``decompose_`` warns about a layer whose truncation changes its weight by more than this
#: (relative Frobenius norm): it was not (close to) rank r, so the model's outputs change.
TRUNCATION_RTOL = 1e-3


@torch.no_grad()
def decompose_(
    model: nn.Module,
    *,
    rank_ratio: float | None = None,
    ranks: Mapping[str, float | int] | None = None,
    include_linear: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    min_rank: int = 1,
    rank_rtol: float | None = None,
    target_flops_reduction: float | None = None,
    target_params_reduction: float | None = None,
    allocation: str = "uniform",
    example_inputs: Any = None,
) -> dict[str, int]:
    """Replace each targeted layer by its two thin layers, in place (ALGORITHM.md §6).

    With ``rank_ratio``/``ranks`` the layers are truncated at those ranks (exact after an
    LRPET projection at the same ranks with ``residual_scale=0``; a layer whose truncation
    changes its weight by more than ``TRUNCATION_RTOL`` is named in a warning). With
    neither, each layer's rank is read off its weight: the number of singular values above
    ``rank_rtol * s_max`` (default ``max(rows, cols) * eps`` of the weight's dtype, at most
    ``1e-2``). A layer whose factorization would not save parameters
    (``r * (rows + cols) >= rows * cols``) stays dense.

    Transactional: every targeted layer is checked and factorized first, then all are
    swapped in; a layer with NaN/Inf weights stays dense. With ``example_inputs`` one
    forward pass also finds the layers whose ``.weight`` their parent reads directly, which
    stay dense (a thin pair would be rebuilt into the dense matrix on every read). A module
    registered under several names is replaced under all of them by one factorized module.
    Everything left dense is named, with its reason, in one warning.

    With a budget instead — ``target_flops_reduction`` (needs ``example_inputs``) or
    ``target_params_reduction``, a fraction in (0, 1) — the ranks are solved so that the
    decomposed model has that many fewer FLOPs / parameters (within a fraction of a point
    above), by ``allocation="uniform"`` (one rank ratio) or ``"spectrum"`` (from the current
    weights' spectra, BN-rectified when ``example_inputs`` is given); see
    :func:`~lrpet_lightning.core.budget.solve_ranks`.

    Returns:
        ``{module_name: rank}`` of the layers that were decomposed.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 1))
        >>> ranks = decompose_(model, rank_ratio=0.25)  # the weights are not rank 4: warns
        >>> ranks
        {'0': 4, '2': 8}
        >>> fresh = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 1))
        >>> decompose_(fresh, ranks=ranks) == ranks  # rebuild the same thin architecture
        True
    """
    budget = target_flops_reduction is not None or target_params_reduction is not None
    infer = rank_ratio is None and not ranks and not budget
    config = LowRankConfig(
        rank_ratio=1.0 if infer else rank_ratio, ranks=ranks, include_linear=include_linear,
        include=include, exclude=exclude, min_rank=min_rank,
        target_flops_reduction=target_flops_reduction,
        target_params_reduction=target_params_reduction, allocation=allocation,
    )
    if rank_rtol is not None and not (isinstance(rank_rtol, float) and 0.0 < rank_rtol < 1.0):
        raise ValueError(f"rank_rtol must be a float in (0, 1), got {rank_rtol!r}")
    plan = plan_layers(model, config, example_inputs)
    if infer and any(layer.module.weight.is_meta for layer in plan.layers):
        raise ValueError(
            f"decompose_ without rank_ratio, ranks or a budget reads each layer's rank off its "
            f"weights, but {type(model).__name__} has weights on the meta device (no values); "
            "pass rank_ratio= or ranks=, or materialize the weights first"
        )
    replacements: list[tuple[TargetLayer, FactorizedLayer]] = []
    changed: list[str] = []
    for layer in plan.layers:
        M = layer.matrix()
        real = not M.is_meta
        if real and not _all_finite(M):
            plan.skipped[layer.name] = "NaN/Inf weights: kept dense"
            continue
        rank = layer.rank
        if infer:
            rtol = rank_rtol or min(max(M.shape) * torch.finfo(M.dtype).eps, 1e-2)
            rank = numerical_rank(M.double(), rtol)
        if not _saves_parameters(layer, rank):
            plan.notes[layer.name] = (f"rank {rank} of {layer.full_rank}: factorizing would "
                                      "not save parameters; kept dense")
            continue
        try:
            thin = factorized_type(layer.module).from_dense(layer.module, rank)
        except (torch.linalg.LinAlgError, RuntimeError) as err:
            plan.skipped[layer.name] = f"factorization failed ({err}): kept dense"
            continue
        if real:
            error = _relative_error(layer, thin, M)
            if not error <= TRUNCATION_RTOL:
                changed.append(f"{layer.name} (rank {rank}: weight changed by "
                               f"{100 * error:.2g} %)")
        replacements.append((layer, thin))
    for layer, thin in replacements:  # all at once: never a half-decomposed model
        for name in layer.aliases or (layer.name,):
            set_submodule(model, name, thin)
    plan.warn("decompose_")
    if changed:
        warnings.warn(
            f"decompose_: {len(changed)} layer(s) were not rank r, so truncating them changes "
            f"the model's outputs (project with the same ranks first, e.g. train with "
            f"LowRankProjectionCallback): {', '.join(changed[:6])}"
            + (f" and {len(changed) - 6} more" if len(changed) > 6 else ""),
            UserWarning, stacklevel=2)
    if not replacements:
        warnings.warn(f"decompose_: no layer of {type(model).__name__} was decomposed",
                      UserWarning, stacklevel=2)
    return {layer.name: thin.rank for layer, thin in replacements}


def _relative_error(layer: TargetLayer, thin: FactorizedLayer, M: torch.Tensor) -> float:
    """``||M - second @ first||_F / ||M||_F`` of a freshly factorized layer."""
    product = layer_matrix(thin, thin.dense_weight())
    norm = float(torch.linalg.matrix_norm(M.double()))
    diff = float(torch.linalg.matrix_norm(M.double() - product.double()))
    return diff / norm if norm > 0 else 0.0


_FIRST = ".first.weight"


@torch.no_grad()
def match_architecture_(
    model: nn.Module, state_dict: Mapping[str, Any], prefix: str = ""
) -> dict[str, int]:
    """Decompose the dense layers of ``model`` that ``state_dict`` holds as thin pairs, at
    the ranks read off the thin weights' shapes, so that the state dict loads.

    The other direction needs nothing: a factorized layer loads a dense weight by
    splitting it. Returns ``{layer name: rank}`` of the layers decomposed now.

    Example:
        >>> match_architecture_(dense_model, torch.load(path, weights_only=True))
        >>> dense_model.load_state_dict(...)  # now decomposed where the file is
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    ranks: dict[str, int] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not (key.startswith(prefix) and key.endswith(_FIRST)):
            continue
        name = key[len(prefix):-len(_FIRST)]
        module = modules.get(name)
        if module is None or isinstance(module, FactorizedLayer) or id(module) in seen:
            continue
        try:
            factorized = factorized_type(module)
        except TypeError:
            continue
        seen.add(id(module))
        ranks[name] = int(value.shape[0])
        _replace_everywhere(model, module, factorized.from_dense(module, ranks[name]))
    if ranks:
        log.info("match_architecture_: decomposed %d layer(s) to match a checkpoint", len(ranks))
    return ranks


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered in ``model`` (a shared module)."""
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is old]
    for name in names:
        set_submodule(model, name, new)


def decomposed_ranks(model: nn.Module) -> dict[str, int]:
    """``{module_name: rank}`` of the factorized layers in ``model``."""
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedLayer)}


@torch.no_grad()
def recompose_(model: nn.Module) -> list[str]:
    """Undo ``decompose_``: turn every factorized layer back into one dense layer, in place.

    Returns the names of the layers recomposed.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, FactorizedLayer)]
    for name in names:
        layer = model.get_submodule(name)
        _replace_everywhere(model, layer, layer.to_dense())
    return names
