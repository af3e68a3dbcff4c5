"""Decomposition: each targeted layer as two thin layers, and back (docs/method.md).

``decompose_`` turns a projected model into its compact form, ``match_architecture_``
makes a dense model's architecture match a compact checkpoint, ``recompose_`` undoes it.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lrpet_lightning.core.checks import check_float
from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.factorized import FactorizedLayer, factorized_type
from lrpet_lightning.core.linalg import (
    TRUNCATION_RTOL,
    all_finite,
    factorization_pays,
    numerical_rank,
)
from lrpet_lightning.core.plan import plan_layers
from lrpet_lightning.core.walk import CONV_TYPES, TargetLayer, hook_count, layer_matrix, select

__all__ = [
    "TRUNCATION_RTOL",
    "decompose_",
    "decomposed_ranks",
    "match_architecture_",
    "recompose_",
]

log = logging.getLogger(__name__)



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
    rank_multiple: int = 1,
) -> dict[str, int]:
    """Replace each targeted layer by its two thin layers, in place (docs/method.md).

    With ``rank_ratio``/``ranks`` the layers are truncated at those ranks (exact after an
    LRPET projection at the same ranks with ``residual_scale=0``; a layer whose truncation
    changes its weight by more than ``TRUNCATION_RTOL`` is named in a warning). With
    neither, each layer's rank is read off its weight: the number of singular values above
    ``rank_rtol * s_max`` (default ``max(rows, cols) * eps`` of the weight's dtype, at most
    ``1e-2``); Linear layers with low-rank weights left out (``include_linear=False``) are
    named. A layer whose factorization would not save parameters
    (``r * (rows + cols) >= rows * cols``) stays dense, and so does a layer with forward or
    backward hooks (its thin pair would not run them).

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
    :func:`~lrpet_lightning.core.budget.solve_ranks`. ``rank_multiple`` rounds the ranks
    from a ratio or a budget as in ``project_low_rank_`` (an int in ``ranks`` is kept).

    Returns:
        ``{module_name: rank}`` of the layers that were decomposed.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 1))
        >>> ranks = decompose_(model, rank_ratio=0.25)  # the weights are not rank 8: warns
        >>> ranks
        {'0': 8, '2': 8}
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
        rank_multiple=rank_multiple,
    )
    check_float("rank_rtol", rank_rtol, low=0, high=1, low_open=True, high_open=True,
                optional=True, meaning="singular values below rank_rtol * s_max do not count")
    plan = plan_layers(model, config, example_inputs)
    if infer:  # planned at full rank only to be read off the weights: not a finding
        plan.notes.pop("(all)", None)
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
        if real and not all_finite(M):
            plan.skipped[layer.name] = "NaN/Inf weights: kept dense"
            continue
        if hooks := hook_count(layer.module):
            plan.skipped[layer.name] = (
                f"{hooks} forward/backward hook(s) registered on it, which a thin pair would "
                "not run: kept dense (remove them before decompose_, register them after)")
            continue
        rank = layer.rank
        if infer:
            rtol = rank_rtol or min(max(M.shape) * torch.finfo(M.dtype).eps, 1e-2)
            rank = numerical_rank(M.double(), rtol)
        if not factorization_pays(*M.shape, rank):
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
            # Half precision rounds the thin factors by its own eps, whatever the ranks.
            if not error <= max(TRUNCATION_RTOL, 4 * torch.finfo(M.dtype).eps):
                changed.append(f"{layer.name} (rank {rank}: weight changed by "
                               f"{100 * error:.2g} %)")
        replacements.append((layer, thin))
    for layer, thin in replacements:  # all at once: never a half-decomposed model
        for name in layer.aliases or (layer.name,):
            model.set_submodule(name, thin)
    # One warning per call: what was left dense, what truncation changed, and whether
    # anything was decomposed at all.
    if changed:
        plan.notes["(not rank r)"] = (
            f"{len(changed)} layer(s) were not rank r, so truncating them changes the "
            f"model's outputs (project with the same ranks first, e.g. train with "
            f"LowRankProjectionCallback): {', '.join(changed[:6])}"
            + (f" and {len(changed) - 6} more" if len(changed) > 6 else ""))
    # Reading ranks off the weights (the call after a fit): say which Linears it left.
    if infer and not include_linear and (linears := _low_rank_linears(model, config,
                                                                      rank_rtol)):
        plan.notes["(linear)"] = (
            f"{len(linears)} Linear layer(s) have low-rank weights (projected with "
            f"include_linear=True?) but stay dense without include_linear=True: "
            f"{', '.join(linears[:6])}" + (f" and {len(linears) - 6} more"
                                          if len(linears) > 6 else ""))
    if not replacements:
        plan.notes["(nothing)"] = f"no layer of {type(model).__name__} was decomposed"
    plan.warn("decompose_")
    return {layer.name: thin.rank for layer, thin in replacements}


def _low_rank_linears(model: nn.Module, config: LowRankConfig,
                      rank_rtol: float | None) -> list[str]:
    """The Linear layers ``config`` would target with ``include_linear=True`` whose weights
    are low rank enough that their thin pair would be smaller (left dense without it)."""
    try:
        found = select(model, dataclasses.replace(config, include_linear=True)).layers
    except ValueError:  # a pattern that only makes sense for the convs
        return []
    names = []
    for layer in found:
        if isinstance(layer.module, CONV_TYPES) or layer.module.weight.is_meta:
            continue
        M = layer.matrix().double()
        if not all_finite(M):
            continue
        rtol = rank_rtol or min(max(M.shape) * torch.finfo(layer.module.weight.dtype).eps, 1e-2)
        if factorization_pays(*M.shape, numerical_rank(M, rtol)):
            names.append(layer.name)
    return names


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
        >>> compact = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 1))
        >>> _ = decompose_(compact, ranks={"0": 4})
        >>> dense = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 1))
        >>> match_architecture_(dense, compact.state_dict())
        {'0': 4}
        >>> dense.load_state_dict(compact.state_dict())  # now decomposed where the file is
        <All keys matched successfully>
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
        try:
            thin = factorized.from_dense(module, ranks[name])
        except ValueError as err:  # a rank the layer cannot have: another architecture
            raise ValueError(f"the state dict holds {name!r} as a thin pair of rank "
                             f"{ranks[name]}, which this {type(module).__name__} cannot "
                             f"have: {err}") from err
        _replace_everywhere(model, module, thin)
    if ranks:
        log.info("match_architecture_: decomposed %d layer(s) to match a checkpoint", len(ranks))
    return ranks


#: The hook registries of ``nn.Module`` that run around its forward and backward.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_pre_hooks", "_backward_hooks")


def _carry_hooks(old: nn.Module, new: nn.Module, model: nn.Module) -> None:
    """Register ``old``'s forward/backward hooks on its replacement ``new``, with a warning:
    a state dict or a recomposition must swap the module, and its hooks must keep running."""
    if not hook_count(old):
        return
    for name in _HOOK_DICTS:
        if hasattr(old, name) and hasattr(new, name):
            getattr(new, name).update(getattr(old, name))
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is old]
    warnings.warn(f"{type(model).__name__}: {hook_count(old)} hook(s) of "
                  f"{names[0] if names else 'a layer'} carried over onto its "
                  f"{type(new).__name__} replacement; they now receive the new module, and "
                  "their old handles no longer remove them", stacklevel=3)


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered in ``model`` (a shared module), with its
    hooks."""
    _carry_hooks(old, new, model)
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is old]
    for name in names:
        model.set_submodule(name, new)


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
