"""``rank_multiple``: every rank from a ratio or a budget is a multiple of it, or the
layer's full rank; an int in ``ranks`` is kept; 1 gives exactly the ranks of before."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import Tiny, conv_ranks, make_trainer
from torch import nn

from lrpet_lightning import (
    LowRankProjectionCallback,
    compression_report,
    decompose_,
    project_low_rank_,
    solve_ranks,
)
from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.linalg import rank_from_ratio, round_rank
from lrpet_lightning.core.plan import select_plan
from lrpet_lightning.models import build_model


def _allowed(rank: int, full_rank: int, multiple: int) -> bool:
    return rank % multiple == 0 or rank == full_rank


def _full_rank(model: nn.Module, name: str) -> int:
    w = model.get_submodule(name).weight
    return min(w.shape[0], w[0].numel())


# ------------------------------------------------------------------- the rounding rule
@pytest.mark.parametrize(
    ("full_rank", "ratio", "min_rank", "expected"),
    [
        (256, 0.38, 1, 96),   # 97 -> 96 (nearest)
        (512, 0.38, 1, 192),  # 194 -> 192
        (1024, 0.38, 1, 392),  # 389 -> 392 (nearest is above)
        (64, 0.375, 1, 24),   # 24 is a multiple already
        (64, 0.19, 1, 16),    # 12: a tie between 8 and 16, goes up
        (64, 0.01, 1, 8),     # 1 -> the floor at rank_multiple itself
        (6, 0.5, 1, 6),       # full rank below the multiple: keeps its full rank
        (20, 0.95, 1, 20),    # 19: the full rank 20 is nearer than 16
        (20, 0.45, 1, 8),     # 9 -> 8
        (64, 0.16, 10, 16),   # 10 (min_rank) -> 8 would be below min_rank: 16
        (64, 1.0, 1, 64),
    ],
)
def test_rank_from_ratio_rounds_to_multiples(full_rank: int, ratio: float, min_rank: int,
                                             expected: int) -> None:
    assert rank_from_ratio(full_rank, ratio, min_rank, rank_multiple=8) == expected


def test_round_rank_is_monotone_and_allowed() -> None:
    for n in (3, 8, 20, 64, 100):
        ranks = [round_rank(r, n, 8) for r in range(1, n + 1)]
        assert ranks == sorted(ranks)
        assert all(_allowed(r, n, 8) and 1 <= r <= n for r in ranks), (n, ranks)


def test_rank_multiple_one_gives_todays_ranks() -> None:
    for n in range(1, 129):
        for k in range(1, 21):
            assert (rank_from_ratio(n, k / 20, 2, rank_multiple=1)
                    == min(max(2, int(k / 20 * n + 1e-9)), n))
    model = build_model("resnet20")
    for ratio in (0.2, 0.38, 0.5):
        assert (select_plan(model, LowRankConfig(rank_ratio=ratio, rank_multiple=1)).ranks
                == select_plan(model, LowRankConfig(rank_ratio=ratio)).ranks)


def test_ratio_overrides_round_and_int_ranks_are_kept() -> None:
    model = nn.Sequential(nn.Conv2d(16, 64, 3), nn.Conv2d(64, 64, 3), nn.Conv2d(64, 64, 1))
    config = LowRankConfig(rank_ratio=0.3, ranks={"1": 0.2, "2": 13}, rank_multiple=8)
    # 0.3 * 64 = 19 -> 16; 0.2 * 64 = 12 -> 16 (tie, up); the int 13 is the user's own rank
    assert select_plan(model, config).ranks == {"0": 16, "1": 16, "2": 13}


def test_project_and_decompose_round() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3))
    fresh = copy.deepcopy(model)
    records = project_low_rank_(model, rank_ratio=0.3, rank_multiple=8,
                                bn_rectification=False)
    assert [r.rank for r in records] == [16, 16]  # 0.3 * 64 = 19 -> 16
    with pytest.warns(UserWarning, match="truncat"):  # random weights are not rank 16
        assert decompose_(fresh, rank_ratio=0.3, rank_multiple=8) == {"0": 16, "2": 16}


# ------------------------------------------------------------------------- the budgets
@pytest.fixture(scope="module")
def resnet56() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet56", num_classes=10)


@pytest.mark.parametrize("allocation", ["uniform", "spectrum"])
@pytest.mark.parametrize(("metric", "target"), [("flops", 0.5), ("params", 0.6)])
def test_budget_meets_the_target_with_multiples(resnet56: nn.Module, allocation: str,
                                                metric: str, target: float) -> None:
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():  # coarse steps may land > 1 point above: said, fine
        warnings.simplefilter("ignore", RuntimeWarning)
        solution = solve_ranks(resnet56, x, allocation=allocation, rank_multiple=8,
                               **{f"target_{metric}_reduction": target})
    assert solution.rank_multiple == 8
    assert all(_allowed(r, _full_rank(resnet56, n), 8) for n, r in solution.ranks.items())
    assert any(r < _full_rank(resnet56, n) for n, r in solution.ranks.items())
    compact = copy.deepcopy(resnet56)
    decompose_(compact, ranks=solution.ranks)
    report = compression_report(resnet56, compact, x)
    achieved = report.flops_reduction if metric == "flops" else report.params_reduction
    assert achieved >= target
    assert solution.flops_reduction == pytest.approx(report.flops_reduction, abs=1e-12)
    # the rounding's price, measured by the same solver with any rank
    unrounded = solve_ranks(resnet56, x, allocation=allocation,
                            **{f"target_{metric}_reduction": target})
    assert solution.unrounded_flops_reduction == pytest.approx(unrounded.flops_reduction)
    assert "multiples of 8" in solution.summary()


def test_budget_rank_multiple_one_is_unchanged(resnet56: nn.Module) -> None:
    x = torch.randn(1, 3, 32, 32)
    for allocation in ("uniform", "spectrum"):
        a = solve_ranks(resnet56, x, target_flops_reduction=0.5, allocation=allocation)
        b = solve_ranks(resnet56, x, target_flops_reduction=0.5, allocation=allocation,
                        rank_multiple=1)
        assert a.ranks == b.ranks and b.unrounded_flops_reduction is None


def test_unmeetable_budget_names_the_rounding() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))  # full ranks 8: dense
    with pytest.raises(ValueError, match=r"rounded to rank_multiple=8"):
        solve_ranks(model, target_params_reduction=0.1, rank_multiple=8)


# ------------------------------------------------------------------------ the callback
def test_callback_ends_with_multiples_of_8() -> None:
    torch.manual_seed(0)
    model = Tiny()
    cb = LowRankProjectionCallback(rank_ratio=0.4, rank_multiple=8, report=False)
    with pytest.warns(UserWarning, match=r"net.conv3: rank 8 of 16 \(rounded to a multiple"):
        make_trainer([cb], max_epochs=1).fit(model)
    # rank_ratio 0.4 of 16 alone would give 6; conv3 (1x1, 16x16) at 8 would not pay
    assert cb.ranks == {"net.conv1": 8, "net.conv2": 8, "net.conv3": 16}
    assert conv_ranks(model) == cb.ranks  # the trained weights: exactly those ranks
    assert cb.records[2].skipped == "rank >= full rank"


def test_rounding_to_a_rank_that_would_not_pay_keeps_full_rank() -> None:
    # Linear(9, 64): 0.5 * 9 = 4, rounded to 8; 8 * (64 + 9) >= 64 * 9, so its thin pair
    # would be bigger than it: projecting it each time would cost accuracy for nothing.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 64), nn.ReLU(), nn.Linear(64, 128))
    plan = select_plan(model, LowRankConfig(rank_ratio=0.5, include_linear=True,
                                            rank_multiple=8))
    assert plan.ranks == {"0": 9, "2": 32}
    assert "rank 8 of 9" in plan.notes["0"] and "64x9 weight" in plan.notes["0"]
    unrounded = select_plan(model, LowRankConfig(rank_ratio=0.5, include_linear=True))
    assert unrounded.ranks == {"0": 4, "2": 32} and not unrounded.notes  # as asked
    before = model[0].weight.clone()
    with pytest.warns(UserWarning, match="would not be factorized"):
        records = project_low_rank_(model, rank_ratio=0.5, include_linear=True,
                                    rank_multiple=8, bn_rectification=False)
    assert records[0].skipped == "rank >= full rank" and records[1].skipped is None
    assert torch.equal(model[0].weight, before)


def test_state_key_only_changes_with_rounding() -> None:
    plain = LowRankProjectionCallback(rank_ratio=0.4)
    assert "rank_multiple" not in plain.state_key
    assert LowRankProjectionCallback(rank_ratio=0.4, rank_multiple=1).state_key == plain.state_key
    assert "rank_multiple" in LowRankProjectionCallback(rank_ratio=0.4,
                                                        rank_multiple=8).state_key


# ------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, r"^rank_multiple must be an int >= 1 .*got 0$"),
        (-8, ValueError, r"^rank_multiple must be an int >= 1 .*got -8$"),
        (8.0, TypeError, r"^rank_multiple must be an int >= 1 .*got 8\.0$"),
        (True, TypeError, r"^rank_multiple must be an int >= 1 .*got True$"),
        ("8", TypeError, r"^rank_multiple must be an int >= 1 .*got '8' \(str\)$"),
    ],
)
def test_bad_rank_multiple_is_rejected(value, error, match) -> None:
    with pytest.raises(error, match=match):
        LowRankConfig(rank_ratio=0.5, rank_multiple=value)
    with pytest.raises(error, match=match):
        LowRankProjectionCallback(rank_ratio=0.5, rank_multiple=value)
    with pytest.raises(error, match=match):
        solve_ranks(nn.Conv2d(3, 8, 3), target_params_reduction=0.1, rank_multiple=value)
