"""The knobs of LRPET, validated once and shared by the functions, the callback and the configs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from lrpet_lightning.core.checks import check_bool, check_choice, check_float, check_int
from lrpet_lightning.core.linalg import SVD_METHODS

__all__ = ["ALLOCATIONS", "LowRankConfig", "check_rank_ratio", "check_reduction"]

#: Names accepted by ``allocation``: how a FLOPs / parameters budget is shared by the layers.
ALLOCATIONS = ("uniform", "spectrum")


def check_rank_ratio(name: str, value: Any) -> float:
    """A kept fraction of the full rank: a real number in (0, 1].

    >>> check_rank_ratio("rank_ratio", 0.25)
    0.25
    >>> check_rank_ratio("rank_ratio", 0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: rank_ratio must be a number in (0, 1] (the kept fraction of each ...), got 0
    """
    return check_float(name, value, low=0, high=1, low_open=True,
                       meaning="the kept fraction of each layer's full rank")


def check_reduction(name: str, value: Any) -> float:
    """A budget: the fraction of the model's FLOPs or parameters to remove, in (0, 1)."""
    what = "FLOPs" if "flops" in name else "parameters"
    return check_float(name, value, low=0, high=1, low_open=True, high_open=True,
                       meaning=f"the fraction of the model's {what} to remove, e.g. 0.5")


def _check_patterns(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise TypeError(
        f"{name} must be None, a glob pattern string or a list of them "
        f"(matched against qualified module names such as 'layer1.0.conv1'), got {value!r}"
    )


def _check_ranks(value: Any) -> dict[str, float | int] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            "ranks must be a mapping of module-name glob patterns to a kept ratio (float in "
            f"(0, 1]) or an absolute rank (int >= 1), got {value!r}"
        )
    out: dict[str, float | int] = {}
    for pattern, rank in value.items():
        if not isinstance(pattern, str):
            raise TypeError(f"ranks keys must be module-name patterns (str), got {pattern!r}")
        name = f"ranks[{pattern!r}]"
        if isinstance(rank, Integral) and not isinstance(rank, bool):
            out[pattern] = check_int(name, rank, minimum=1,
                                     meaning="an absolute rank; a float is a ratio in (0, 1]")
        elif isinstance(rank, Real) and not isinstance(rank, bool):
            out[pattern] = check_rank_ratio(name, rank)
        else:
            raise TypeError(f"{name} must be an absolute rank >= 1 (int) or a ratio in (0, 1] "
                            f"(float), got {rank!r}")
    return out


@dataclass(frozen=True)
class LowRankConfig:
    """Validated LRPET settings; the keyword names are those of ``project_low_rank_``.

    Args:
        rank_ratio: kept fraction of each targeted layer's full rank, in (0, 1]. ``None``
            targets only the layers named in ``ranks``.
        ranks: ``{pattern: ratio_or_rank}`` overrides; a float is a ratio, an int an
            absolute rank. An exact module name wins over patterns; among patterns the
            first that matches (in the mapping's order) wins.
        energy_transfer: rescale the kept singular values to keep each matrix's energy.
        residual_scale: factor on the discarded singular values (0 = exact rank r), in [0, 1].
        bn_rectification: project the conv as the following BatchNorm sees it.
        include_linear: also target ``nn.Linear`` layers (convs are always targets).
        include, exclude: glob patterns on qualified module names.
        min_rank: smallest rank any layer keeps.
        rank_multiple: round every kept rank to a multiple of it (8: vector widths run
            faster), see ``linalg.round_rank``: the nearest multiple (ties up), at least
            ``min_rank``; a layer may also keep its full rank (it stays dense), e.g. one
            whose full rank is below ``rank_multiple``. Applies to ratios (``rank_ratio``,
            float ``ranks``) and to the budget solvers; an int in ``ranks`` is an absolute
            rank and is kept as given. 1 (default): no rounding.
        svd_method: ``"gram"`` (default), ``"gram32"`` (fast mode), ``"exact"``,
            ``"randomized"`` or ``"subspace"`` (top-r, certified, else ``"gram"``)
            (see ``top_singular_triplets``).
        target_flops_reduction: a FLOPs budget instead of ``rank_ratio``: the fraction of
            the model's FLOPs to remove, in (0, 1); the ranks are solved for it
            (``lrpet_lightning.core.budget.solve_ranks``).
        target_params_reduction: the same for the model's parameters. At most one budget;
            a budget excludes ``rank_ratio`` and ``ranks``.
        allocation: how a budget is shared: ``"uniform"`` (one rank ratio for every layer)
            or ``"spectrum"`` (per-layer ranks keeping the most energy per FLOP / parameter,
            as the product of the layers' kept fractions).
            Ignored without a budget.
    """

    rank_ratio: float | None = None
    ranks: Mapping[str, float | int] | None = None
    energy_transfer: bool = True
    residual_scale: float = 0.0
    bn_rectification: bool = True
    include_linear: bool = False
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    min_rank: int = 1
    rank_multiple: int = 1
    svd_method: str = "gram"
    target_flops_reduction: float | None = None
    target_params_reduction: float | None = None
    allocation: str = "uniform"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise fields once, here
        if self.rank_ratio is not None:
            set_(self, "rank_ratio", check_rank_ratio("rank_ratio", self.rank_ratio))
        set_(self, "ranks", _check_ranks(self.ranks))
        self._check_budget()
        if self.rank_ratio is None and not self.ranks and self.budget is None:
            raise ValueError(
                "rank_ratio is None and ranks is empty: give rank_ratio (a kept fraction in "
                "(0, 1], e.g. 0.25), ranks ({pattern: ratio_or_rank}) or a budget "
                "(target_flops_reduction or target_params_reduction, in (0, 1))"
            )
        for flag in ("energy_transfer", "bn_rectification", "include_linear"):
            check_bool(flag, getattr(self, flag))
        set_(self, "residual_scale", check_float(
            "residual_scale", self.residual_scale, low=0, high=1,
            meaning="factor on the discarded singular values; 0 = exactly rank r"))
        set_(self, "include", _check_patterns("include", self.include))
        set_(self, "exclude", _check_patterns("exclude", self.exclude))
        set_(self, "min_rank", check_int("min_rank", self.min_rank, minimum=1,
                                         meaning="the smallest rank any layer keeps"))
        set_(self, "rank_multiple", check_int(
            "rank_multiple", self.rank_multiple, minimum=1,
            meaning="every kept rank is rounded to a multiple of it; 1: no rounding"))
        check_choice("svd_method", self.svd_method, SVD_METHODS)

    def _check_budget(self) -> None:
        set_ = object.__setattr__
        targets = {}
        for name in ("target_flops_reduction", "target_params_reduction"):
            value = getattr(self, name)
            if value is not None:
                targets[name] = check_reduction(name, value)
                set_(self, name, targets[name])
        check_choice("allocation", self.allocation, ALLOCATIONS,
                     meaning="how a FLOPs / parameters budget is shared by the layers")
        if len(targets) > 1:
            raise ValueError(
                f"target_flops_reduction={self.target_flops_reduction!r} and "
                f"target_params_reduction={self.target_params_reduction!r} are both set; "
                "give one budget"
            )
        if not targets:
            return
        ((name, value),) = targets.items()
        for other in ("rank_ratio", "ranks"):
            if getattr(self, other):
                raise ValueError(
                    f"{other}={getattr(self, other)!r} and {name}={value!r} are both set: a "
                    f"budget chooses every layer's rank itself; set {other}=None (Hydra: "
                    f"callbacks.lrpet.{other}=null) or drop {name}"
                )

    @property
    def budget(self) -> tuple[str, float] | None:
        """``(metric, target)`` of the budget — ``("flops", 0.8)`` — or None without one."""
        if self.target_flops_reduction is not None:
            return "flops", self.target_flops_reduction
        if self.target_params_reduction is not None:
            return "params", self.target_params_reduction
        return None
