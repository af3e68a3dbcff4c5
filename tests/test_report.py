"""``compression_report`` against the paper's figures and hand counts."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from functools import cache

import pytest
import torch
from torch import nn

from lrpet_lightning.core import CompressionReport, compression_report, decompose_
from lrpet_lightning.core.linalg import rank_from_ratio
from lrpet_lightning.models import resnet56, resnet110

INPUT = (1, 3, 32, 32)


@cache
def _report(depth: int, rank_ratio: float) -> tuple[nn.Module, CompressionReport]:
    """Every Conv2d of a CIFAR ResNet decomposed at ``rank_ratio``; cached because the
    same report serves several tests (tests only read it)."""
    factory: Callable[[], nn.Module] = {56: resnet56, 110: resnet110}[depth]
    torch.manual_seed(0)
    dense = factory()
    compact = copy.deepcopy(dense)
    ranks = decompose_(compact, rank_ratio=rank_ratio)
    # The paper decomposes every conv; none may stay dense here.
    assert len(ranks) == sum(isinstance(m, nn.Conv2d) for m in dense.modules())
    return dense, compression_report(dense, compact, torch.randn(INPUT))


@pytest.mark.parametrize(
    ("depth", "rank_ratio", "paper_percent", "tolerance"),
    [
        (56, 0.20, 79.1, 0.1),  # quoted to one decimal: within rounding of the last digit
        (110, 0.38, 58.2, 0.1),
        (110, 0.30, 69.3, 0.1),
        (56, 0.46, 51.0, 0.5),  # quoted as "~51 %"; half a point allowed
    ],
)
def test_flops_reduction_matches_paper(
    depth: int, rank_ratio: float, paper_percent: float, tolerance: float
) -> None:
    _, report = _report(depth, rank_ratio)
    assert abs(100 * report.flops_reduction - paper_percent) < tolerance


def _conv_costs(conv: nn.Conv2d, rank: int, out_hw: int) -> tuple[int, int, int, int]:
    """(dense FLOPs, compact FLOPs, dense params, compact params) of one bias-free conv,
    counted by hand: 2 FLOPs per multiply-accumulate."""
    n, c = conv.out_channels, conv.in_channels
    k = math.prod(conv.kernel_size)
    dense_params, compact_params = n * c * k, rank * (c * k + n)
    return 2 * dense_params * out_hw, 2 * compact_params * out_hw, dense_params, compact_params


def test_per_layer_rows_match_hand_counts() -> None:
    dense, report = _report(56, 0.20)
    convs = {n: m for n, m in dense.named_modules() if isinstance(m, nn.Conv2d)}
    rows = {row.name: row for row in report.layers}
    assert set(rows) == {*convs, "linear"}
    out_size = {"layer1": 32, "layer2": 16, "layer3": 8, "conv1": 32}
    for name, conv in convs.items():
        row = rows[name]
        rank = rank_from_ratio(min(conv.out_channels, conv.weight[0].numel()), 0.20)
        assert (row.kind, row.rank, row.full_rank) == ("Conv2d", rank, conv.out_channels)
        hw = out_size[name.split(".")[0]] ** 2
        assert (row.dense_flops, row.compact_flops, row.dense_params, row.compact_params) == (
            _conv_costs(conv, rank, hw)), name
    linear = rows["linear"]
    assert linear.rank is None and linear.kind == "Linear"  # Linear layers stay dense
    assert linear.dense_flops == linear.compact_flops == 2 * 64 * 10
    # Conv and Linear layers are all the counted FLOPs in these models.
    assert sum(r.dense_flops for r in report.layers) == report.dense_flops
    assert sum(r.compact_flops for r in report.layers) == report.compact_flops


def test_params_reduction_matches_manual_count() -> None:
    dense, report = _report(56, 0.20)
    assert report.dense_params == 853_018  # the "0.85M" ResNet-56 (see test_models.py)
    saved = 0
    for conv in (m for m in dense.modules() if isinstance(m, nn.Conv2d)):
        rank = rank_from_ratio(conv.out_channels, 0.20)
        _, _, before, after = _conv_costs(conv, rank, 1)
        saved += before - after
    assert report.compact_params == report.dense_params - saved
    assert report.params_reduction == pytest.approx(saved / report.dense_params)


def test_to_dict_is_json_serialisable() -> None:
    _, report = _report(56, 0.20)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["dense_flops"] == report.dense_flops
    assert data["compact_params"] == report.compact_params
    assert data["flops_reduction"] == pytest.approx(report.flops_reduction)
    assert len(data["layers"]) == len(report.layers) == 56
    assert data["layers"][0] == {
        "name": "conv1", "kind": "Conv2d", "dense_flops": report.layers[0].dense_flops,
        "compact_flops": report.layers[0].compact_flops,
        "dense_params": 432, "compact_params": 3 * (27 + 16), "full_rank": 16, "rank": 3,
    }
    assert json.loads(report.to_json()) == data


def test_table_and_markdown_contain_totals() -> None:
    _, report = _report(56, 0.20)
    table, markdown = report.format_table(), report.to_markdown()
    # 250,971,392 -> 52,464,896 FLOPs; 853,018 -> 181,963 parameters.
    for text in (table, markdown, str(report)):
        assert "250.97M" in text and "52.46M" in text
        assert "853.02K" in text and "181.96K" in text
        assert "79.1 % fewer" in text
        assert "layer3.8.conv2" in text and "3/16" in text and "dense/10" in text
    assert any(line.startswith("total") for line in table.splitlines())
    assert "| total |" in markdown
    assert markdown.splitlines()[1].startswith("| --- |")


def test_report_of_an_undecomposed_model_shows_no_saving() -> None:
    model = resnet56()
    report = compression_report(model, copy.deepcopy(model), torch.randn(INPUT))
    assert report.flops_reduction == 0.0 and report.params_reduction == 0.0
    assert all(row.rank is None for row in report.layers)


def test_rank_report_counts_copies_and_qualified_names_the_rows(tmp_path) -> None:
    from lrpet_lightning.core.report import rank_report

    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = rank_report(model, {"2": 8}, torch.randn(1, 3, 16, 16))
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in before.items()}  # the model itself is not decomposed
    assert {row.name: row.rank for row in report.layers} == {"0": None, "2": 8}
    assert 0 < report.params_reduction < 1
    named = report.qualified("net")
    assert [row.name for row in named.layers] == ["net.0", "net.2"]
    assert named.flops_reduction == report.flops_reduction and report.qualified("") is report
    path = named.save(tmp_path / "sub" / "report.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(named.to_dict()))


def test_projection_summary_averages_the_projected_layers_only() -> None:
    from lrpet_lightning.core.report import projection_summary
    from lrpet_lightning.core.transforms import LayerRecord

    records = [LayerRecord("a", 2, 4, 0.5, 0.1, False), LayerRecord("b", 2, 4, 0.7, 0.3, True),
               LayerRecord("c", 4, 4, 1.0, 0.0, False, skipped="rank >= full rank")]
    summary = projection_summary(records)
    assert summary == pytest.approx({"mean_kept_energy": 0.6, "mean_relative_change": 0.2})
    per_layer = projection_summary(records, per_layer=True)
    assert per_layer["kept_energy/b"] == 0.7 and "kept_energy/c" not in per_layer
    assert projection_summary([]) == {"mean_kept_energy": 0.0, "mean_relative_change": 0.0}


def test_a_parametrized_weight_is_counted_by_its_owner() -> None:
    from torch.nn.utils import parametrizations

    model = nn.Sequential(nn.Conv2d(3, 16, 3), parametrizations.weight_norm(nn.Conv2d(16, 8, 3)))
    x = torch.randn(1, 3, 12, 12)
    report = compression_report(model, copy.deepcopy(model), x)
    assert report.uncounted == {} and not report.uncounted_note()


# ------------------------------------------------------------------------- rank_report
def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                         nn.Conv2d(32, 32, 3))


def test_rank_report_of_a_partly_decomposed_model_counts_from_the_dense_one() -> None:
    """A run continued from a checkpoint that decomposed some layers plans the rest: the
    report must still compare with the dense model (it said 0 % before)."""
    from lrpet_lightning.core.report import rank_report

    x = torch.randn(1, 3, 12, 12)
    ranks = {"0": 4, "2": 8, "4": 8}
    expected = rank_report(_small_net(), ranks, x)
    partly = _small_net()
    decompose_(partly, ranks={"2": 8, "4": 8})
    report = rank_report(partly, {"0": 4}, x)
    assert report.flops_reduction == expected.flops_reduction > 0.5
    assert report.params_reduction == expected.params_reduction
    assert [(row.name, row.rank) for row in report.layers] == [("0", 4), ("2", 8), ("4", 8)]
    assert type(partly[2]).__name__ != "Conv2d"  # the model itself was not recomposed


def test_rank_report_copies_a_model_with_a_legacy_weight_norm_layer() -> None:
    from lrpet_lightning.core.report import rank_report

    model = _small_net()
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(model[4])
    x = torch.randn(1, 3, 12, 12)
    model(x)  # the hook has set .weight, a computed tensor deepcopy refuses
    report = rank_report(model, {"0": 4, "2": 8}, x)
    assert [(row.name, row.rank) for row in report.layers] == [("0", 4), ("2", 8), ("4", None)]
    assert report.flops_reduction > 0
