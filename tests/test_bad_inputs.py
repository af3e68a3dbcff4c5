"""Bad arguments to ``project_low_rank_`` / ``decompose_``: a TypeError for a wrong type, a
ValueError for a value out of range, each message naming the argument, what is allowed and
the offending value, never an assert."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lrpet_lightning import decompose_, project_low_rank_


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.grouped(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def _linear_only() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _case(kwargs: dict[str, Any], error: type[Exception], match: str, *,
          model: Callable[[], nn.Module] = _Net, case_id: str | None = None) -> Any:
    # The argument under test comes last in kwargs (after the valid prefix): name the case by it.
    if case_id is None:
        key, value = list(kwargs.items())[-1]
        case_id = f"{key}={value!r}"
    return pytest.param(model, kwargs, error, match, id=case_id)


def _ratio_cases(prefix: dict[str, Any]) -> list[Any]:
    """rank_ratio outside (0, 1] (ValueError) or not a real number (TypeError; bool is not a
    number here)."""
    out = []
    for value, shown, error in [(0, "0", ValueError), (-0.1, r"-0\.1", ValueError),
                                (1.5, r"1\.5", ValueError), (float("nan"), "nan", ValueError),
                                ("0.5", r"'0\.5' \(str\)", TypeError), (True, "True", TypeError)]:
        out.append(_case({**prefix, "rank_ratio": value}, error,
                         r"rank_ratio must be a number in \(0, 1\] \(the kept fraction of each "
                         rf"layer's full rank\), got {shown}$", case_id=f"rank_ratio={value!r}"))
    return out


def _ranks_cases(prefix: dict[str, Any]) -> list[Any]:
    """Bad ``ranks`` values and keys, and a pattern that matches no layer."""
    return [
        _case({**prefix, "ranks": {"conv1": 0}}, ValueError,
              r"ranks\['conv1'\] must be an int >= 1 \(an absolute rank.*got 0$"),
        _case({**prefix, "ranks": {"conv1": -3}}, ValueError,
              r"ranks\['conv1'\] must be an int >= 1 \(an absolute rank.*got -3$"),
        _case({**prefix, "ranks": {"conv1": 1.2}}, ValueError,
              r"ranks\['conv1'\] must be a number in \(0, 1\].*got 1\.2$"),
        _case({**prefix, "ranks": {"conv1": "x"}}, TypeError,
              r"ranks\['conv1'\] must be an absolute rank >= 1 \(int\) or a ratio.*got 'x'$"),
        _case({**prefix, "ranks": {1: 0.5}}, TypeError,
              r"ranks keys must be module-name patterns \(str\), got 1$"),
        _case({**prefix, "ranks": [0.5]}, TypeError, r"ranks must be a mapping.*got \[0\.5\]$"),
        _case({**prefix, "ranks": {"layer9.*": 0.5}}, ValueError,
              r"ranks pattern 'layer9\.\*' matches no targeted layer"),
    ]


def _selection_cases(prefix: dict[str, Any]) -> list[Any]:
    """include/exclude mistakes and models with nothing to target."""
    return [
        _case({**prefix, "include": "head*"}, ValueError,
              r"include pattern 'head\*' matches no eligible layer; eligible layers: conv1, "
              r"conv2$"),
        _case({**prefix, "exclude": ["conv1", "nope"]}, ValueError,
              r"exclude pattern 'nope' matches no eligible layer"),
        _case({**prefix, "include": "grouped"}, ValueError,
              r"include names 'grouped', which cannot be projected: grouped conv \(groups=2\)"),
        _case({**prefix, "include": 3}, TypeError, r"include must be None, a glob pattern.*got 3$"),
        _case({**prefix, "min_rank": 0}, ValueError,
              r"min_rank must be an int >= 1 \(the smallest rank any layer keeps\), got 0$"),
        _case({**prefix, "min_rank": 2.0}, TypeError, r"min_rank must be an int >= 1.*got 2\.0$"),
        _case(prefix, ValueError, r"no layer of Sequential is targeted", model=_linear_only,
              case_id="model without conv"),
    ]


PROJECT = {"rank_ratio": 0.5, "bn_rectification": False}
PROJECT_CASES = [
    *_ratio_cases({"bn_rectification": False}),
    _case({}, ValueError, r"rank_ratio is None and ranks is empty",
          case_id="no rank_ratio or ranks"),
    _case({"ranks": {}}, ValueError, r"rank_ratio is None and ranks is empty",
          case_id="empty ranks"),
    *_ranks_cases(PROJECT),
    *_selection_cases(PROJECT),
    *[_case({**PROJECT, "residual_scale": v}, error,
            r"residual_scale must be a number in \[0, 1\] \(factor on the discarded singular "
            rf"values; 0 = exactly rank r\), got {re.escape(shown)}$",
            case_id=f"residual_scale={v!r}")
      for v, shown, error in [(-0.1, "-0.1", ValueError), (2, "2", ValueError),
                              (float("nan"), "nan", ValueError),
                              ("0", "'0' (str)", TypeError)]],
    _case({**PROJECT, "svd_method": "foo"}, ValueError,
          r"svd_method must be one of 'exact', 'gram', 'gram32', 'randomized', 'subspace', "
          r"got 'foo'$"),
    _case({**PROJECT, "energy_transfer": "yes"}, TypeError,
          r"energy_transfer must be True or False, got 'yes' \(str\)$"),
    _case({"rank_ratio": 0.5, "example_inputs": torch.randn(2, 5, 8, 8)}, ValueError,
          r"example_inputs of shape \(2, 5, 8, 8\) do not run through _Net",
          case_id="example_inputs wrong shape"),
]

DECOMPOSE_CASES = [
    *_ratio_cases({}),
    *_ranks_cases({"rank_ratio": 0.5}),
    *_selection_cases({"rank_ratio": 0.5}),
    *[_case({"rank_rtol": v}, error,
            r"rank_rtol must be a number in \(0, 1\) or None \(singular values below "
            rf"rank_rtol \* s_max do not count\), got {re.escape(shown)}$",
            case_id=f"rank_rtol={v!r}")
      for v, shown, error in [(0.0, "0.0", ValueError), (1.0, "1.0", ValueError),
                              (2, "2", ValueError), ("1e-3", "'1e-3' (str)", TypeError)]],
]


@pytest.mark.parametrize(("model", "kwargs", "error", "match"), PROJECT_CASES)
def test_project_low_rank_rejects(model: Callable[[], nn.Module], kwargs: dict[str, Any],
                                  error: type[Exception], match: str) -> None:
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(error, match=match):
        project_low_rank_(net, **kwargs)
    # Arguments are checked before anything is written.
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(("model", "kwargs", "error", "match"), DECOMPOSE_CASES)
def test_decompose_rejects(model: Callable[[], nn.Module], kwargs: dict[str, Any],
                           error: type[Exception], match: str) -> None:
    net = model()
    modules = [type(m) for m in net.modules()]
    with pytest.raises(error, match=match):
        decompose_(net, **kwargs)
    assert [type(m) for m in net.modules()] == modules  # nothing was replaced
