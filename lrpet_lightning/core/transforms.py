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
from lrpet_lightning.core.factorized import FACTORIZED_TYPES, FactorizedLayer
from lrpet_lightning.core.linalg import (
    ZERO_LAYER_TOL,
    ProjectionResult,
    bn_scale,
    matrix_to_weight,
    numerical_rank,
    project_matrix,
    weight_to_matrix,
)
from lrpet_lightning.core.walk import TargetLayer, select_layers, trace_bn_pairs

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

log = logging.getLogger("lrpet_lightning")


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


def attach_bn_pairs(
    layers: Sequence[TargetLayer], pairs: Mapping[str, tuple[str, nn.Module]]
) -> None:
    """Record each layer's following BatchNorm (from ``trace_bn_pairs`` or ``BNPairTracer``)."""
    for layer in layers:
        layer.bn_name, layer.bn = pairs.get(layer.name, (None, None))


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


@torch.no_grad()
def project_layers_(layers: Sequence[TargetLayer], config: LowRankConfig) -> list[LayerRecord]:
    """Project every layer of ``layers`` in place (the workhorse of ``project_low_rank_``).

    Each weight is written into its existing Parameter (``copy_``), in the parameter's
    dtype, so optimizers, DDP buckets and ``torch.compile`` keep seeing it. A layer that
    cannot be projected (NaN/Inf, all-zero, SVD failure) is left unchanged, reported in
    its record, and — for faults — warned about; the others go on.
    """
    records = []
    for layer in layers:
        weight = layer.module.weight
        # float32 maths (float64 for float64 weights); "gram" forms and solves its Gram
        # matrix in float64 itself, the one step that needs it.
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        M = weight_to_matrix(weight.detach()).to(compute)
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
        try:
            result = _project_with_fallbacks(M, layer.rank, scale, config)
        except RuntimeError as err:
            warnings.warn(f"LRPET: projection of {layer.name} failed and is skipped: {err}",
                          RuntimeWarning, stacklevel=2)
            records.append(LayerRecord(**record, kept_energy=float("nan"),
                                       relative_change=0.0, skipped=f"SVD failed: {err}"))
            continue
        if result.top_singular_value < ZERO_LAYER_TOL:
            records.append(LayerRecord(**record, kept_energy=1.0, relative_change=0.0,
                                       skipped="all-zero layer"))
            continue
        weight.copy_(matrix_to_weight(result.matrix, weight.shape).to(weight))
        records.append(LayerRecord(**record, kept_energy=result.kept_energy,
                                   relative_change=result.relative_change))
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
    if config.budget is not None:
        from lrpet_lightning.core.budget import budget_selection

        layers = select_layers(model, budget_selection(config))
    else:
        layers = select_layers(model, config)
    if bn_rectification:
        if example_inputs is None:
            warnings.warn(
                "project_low_rank_: bn_rectification=True but example_inputs is None, so the "
                "BatchNorm after each conv cannot be traced; BN rectification is skipped. "
                "Pass example_inputs (one input batch) or bn_rectification=False.",
                UserWarning, stacklevel=2,
            )
        else:
            attach_bn_pairs(layers, trace_bn_pairs(model, layers, example_inputs))
    if config.budget is not None:
        from lrpet_lightning.core.budget import solve_ranks_for_layers

        solution = solve_ranks_for_layers(model, layers, config, example_inputs)
        for layer in layers:
            layer.rank = solution.ranks[layer.name]
    return project_layers_(layers, config)


# ------------------------------------------------------------------------ decomposition
def _factorized_type(module: nn.Module) -> type[FactorizedLayer]:
    for dense_type, factorized in FACTORIZED_TYPES.items():
        if isinstance(module, dense_type):
            return factorized
    raise TypeError(f"no factorized form for {type(module).__name__}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _saves_parameters(module: nn.Module, rank: int) -> bool:
    rows, cols = weight_to_matrix(module.weight).shape
    return rank * (rows + cols) < rows * cols


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
    LRPET projection at the same ranks with ``residual_scale=0``). With neither, each
    layer's rank is read off its weight: the number of singular values above
    ``rank_rtol * s_max`` (default ``max(rows, cols) * eps`` of the weight's dtype,
    at most ``1e-2``). A layer whose factorization would not save parameters
    (``r * (rows + cols) >= rows * cols``) stays dense and is reported in an info line.

    With a budget instead — ``target_flops_reduction`` (needs ``example_inputs``) or
    ``target_params_reduction``, a fraction in (0, 1) — the ranks are solved so that the
    decomposed model has that many fewer FLOPs / parameters (within a fraction of a point
    above), by ``allocation="uniform"`` (one rank ratio) or ``"spectrum"`` (from the current
    weights' spectra, BN-rectified when ``example_inputs`` is given); see
    :func:`~lrpet_lightning.core.budget.solve_ranks`.

    Returns:
        ``{module_name: rank}`` of the layers that were decomposed.

    Example:
        >>> ranks = decompose_(model, rank_ratio=0.25)
        >>> decompose_(fresh_model, ranks=ranks)  # rebuild the same thin architecture
        >>> decompose_(model, target_flops_reduction=0.5, example_inputs=x)
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
    if config.budget is not None:
        from lrpet_lightning.core.budget import budget_selection, solve_ranks_for_layers

        layers = select_layers(model, budget_selection(config))
        if config.allocation == "spectrum" and example_inputs is not None:
            attach_bn_pairs(layers, trace_bn_pairs(model, layers, example_inputs))
        solution = solve_ranks_for_layers(model, layers, config, example_inputs)
        for layer in layers:
            layer.rank = solution.ranks[layer.name]
    else:
        layers = select_layers(model, config)
    decomposed: dict[str, int] = {}
    kept_dense: list[str] = []
    for layer in layers:
        module, rank = layer.module, layer.rank
        if infer:
            M = weight_to_matrix(module.weight.detach()).double()
            rtol = rank_rtol or min(max(M.shape) * torch.finfo(module.weight.dtype).eps, 1e-2)
            rank = numerical_rank(M, rtol)
        if not _saves_parameters(module, rank):
            kept_dense.append(f"{layer.name} (rank {rank} of {layer.full_rank})")
            continue
        _set_submodule(model, layer.name, _factorized_type(module).from_dense(module, rank))
        decomposed[layer.name] = rank
    if kept_dense:
        log.info("decompose_ keeps %d layer(s) dense (no parameter saving): %s",
                 len(kept_dense), ", ".join(kept_dense))
    return decomposed


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
    modules = dict(model.named_modules())
    ranks = {}
    for key, value in state_dict.items():
        if not (key.startswith(prefix) and key.endswith(_FIRST)):
            continue
        name = key[len(prefix):-len(_FIRST)]
        module = modules.get(name)
        if module is not None and not isinstance(module, FactorizedLayer) and any(
            isinstance(module, t) for t in FACTORIZED_TYPES
        ):
            ranks[name] = int(value.shape[0])
    for name, rank in ranks.items():
        module = model.get_submodule(name)
        _set_submodule(model, name, _factorized_type(module).from_dense(module, rank))
    if ranks:
        log.info("match_architecture_: decomposed %d layer(s) to match a checkpoint", len(ranks))
    return ranks


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
        _set_submodule(model, name, model.get_submodule(name).to_dense())
    return names
