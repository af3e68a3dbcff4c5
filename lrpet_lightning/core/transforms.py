"""Module transforms: one LRPET projection of a model's layers, in place (docs/method.md).

The decomposition into thin layers lives in :mod:`lrpet_lightning.core.decomposition`; its
verbs are re-exported here, so ``from lrpet_lightning.core.transforms import decompose_``
keeps working.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.decomposition import (
    TRUNCATION_RTOL,
    decompose_,
    decomposed_ranks,
    match_architecture_,
    recompose_,
)
from lrpet_lightning.core.linalg import (
    ZERO_LAYER_TOL,
    ProjectionResult,
    all_finite,
    bn_scale,
    project_matrix,
)
from lrpet_lightning.core.plan import plan_layers
from lrpet_lightning.core.trace import attach_bn_pairs
from lrpet_lightning.core.walk import TargetLayer

__all__ = [
    "TRUNCATION_RTOL",
    "LayerRecord",
    "attach_bn_pairs",
    "decompose_",
    "decomposed_ranks",
    "match_architecture_",
    "project_layers_",
    "project_low_rank_",
    "recompose_",
]

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
        if all_finite(result.matrix):
            return result
        error = FloatingPointError("projection produced NaN/Inf")
    raise RuntimeError(f"SVD failed after {len(attempts)} attempts: {error}")


def _unit_scale(M: torch.Tensor) -> float:
    """A power of two that brings ``||M||_F`` into [1, 2) when it is below 1 (else 1): exact
    in floating point, so projecting ``M * scale`` and dividing back is projecting ``M``.

    The reference code skips a layer whose largest singular value is below 1e-4
    (``ZERO_LAYER_TOL``, which :func:`project_matrix` keeps). That test is absolute: a small
    but full-rank layer would be left full rank while every report counts it at rank r. On
    the scaled weight the test sees the weight relative to its own norm, so only a weight
    that is all zeros (``scale`` 0 here: nothing to project, already rank 0) is skipped, and
    a BatchNorm that zeroes every channel is still seen as one.
    """
    norm = float(torch.linalg.matrix_norm(M))
    if norm == 0.0:
        return 0.0
    return 2.0 ** -math.floor(math.log2(norm)) if norm < 1.0 else 1.0


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
        if not all_finite(M) or (scale is not None and not all_finite(scale)):
            warnings.warn(f"LRPET: {layer.name} has NaN/Inf weights or BN statistics; "
                          "its projection is skipped", RuntimeWarning, stacklevel=2)
            records.append(LayerRecord(**record, kept_energy=float("nan"),
                                       relative_change=0.0, skipped="non-finite values"))
            continue
        unit = _unit_scale(M)
        if unit == 0.0:
            records.append(LayerRecord(**record, kept_energy=1.0, relative_change=0.0,
                                       skipped="all-zero layer"))
            continue
        M = M * unit if unit != 1.0 else M
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
        projected = result.matrix / unit if unit != 1.0 else result.matrix
        writes.append((weight, layer.weight_from_matrix(projected).to(weight)))
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
    rank_multiple: int = 1,
) -> list[LayerRecord]:
    """One LRPET projection of every targeted layer of ``model``, in place.

    Each Conv (groups=1; and each Linear with ``include_linear=True``) is projected onto
    rank ``r`` by truncated SVD with energy transfer and BN rectification
    (docs/method.md). The BatchNorm following each conv is found by one forward pass on
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
            fast mode: the same in float32), ``"exact"`` (full ``torch.linalg.svd``),
            ``"randomized"`` or ``"subspace"`` (top-r subspace iteration, certified by a
            residual bound, else ``"gram"``; see ``linalg.subspace_triplets``).
        target_flops_reduction, target_params_reduction: a budget instead of
            ``rank_ratio`` — the fraction of FLOPs (needs ``example_inputs``) or parameters
            the decomposed model sheds, in (0, 1); the ranks are solved by
            :func:`~lrpet_lightning.core.budget.solve_ranks` on every call (for repeated
            projections solve once and pass ``ranks=solution.ranks``).
        allocation: ``"uniform"`` or ``"spectrum"``, how a budget is shared by the layers.
        rank_multiple: round each rank from a ratio (or a budget) to a multiple of it, or
            to the layer's full rank (``linalg.round_rank``; 8 suits vector widths); an
            int in ``ranks`` is kept as given. 1: no rounding.

    Returns:
        One :class:`LayerRecord` per targeted layer.

    Raises:
        TypeError: an argument of the wrong type (named in the message).
        ValueError: an argument out of range, or patterns that select nothing.

    Example:
        >>> from lrpet_lightning.models import build_model
        >>> model = build_model("resnet20")
        >>> records = project_low_rank_(model, rank_ratio=0.25,
        ...                             example_inputs=torch.randn(2, 3, 32, 32))
        >>> len(records), records[0].name, records[0].rank, records[0].full_rank
        (19, 'conv1', 4, 16)
        >>> all(r.bn_rectified for r in records)
        True
    """
    config = LowRankConfig(
        rank_ratio=rank_ratio, ranks=ranks, energy_transfer=energy_transfer,
        residual_scale=residual_scale, bn_rectification=bn_rectification,
        include_linear=include_linear, include=include, exclude=exclude,
        min_rank=min_rank, svd_method=svd_method, target_flops_reduction=target_flops_reduction,
        target_params_reduction=target_params_reduction, allocation=allocation,
        rank_multiple=rank_multiple,
    )
    if bn_rectification and example_inputs is None:
        warnings.warn(
            "project_low_rank_: bn_rectification=True but example_inputs is None, so the "
            "BatchNorm after each conv cannot be traced; BN rectification is skipped. "
            "Pass example_inputs (one input batch) or bn_rectification=False.",
            UserWarning, stacklevel=2,
        )
    plan = plan_layers(model, config, example_inputs)
    records = project_layers_(plan.layers, config)
    for record in records:  # left as they are, though targeted: said in the one warning
        if record.skipped in ("all-zero layer", "rank >= full rank"):
            plan.notes.setdefault(record.name, f"{record.skipped}: left as it is (rank "
                                               f"{record.rank} of {record.full_rank})")
    plan.warn("project_low_rank_")
    return records
