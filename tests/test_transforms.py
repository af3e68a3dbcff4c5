"""Module transforms: ``project_low_rank_``, ``decompose_`` and friends on layers and models.

Layer tests are parametrized over the layer kinds LRPET targets (Conv2d 3x3 / 1x1 / strided /
dilated / circular padding, Conv1d, Conv3d, Linear), with and without bias and a following
BatchNorm. Model tests check BN pairing from data flow, layer selection, skips, and that
projection followed by decomposition at the same ranks leaves the function unchanged.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.testing import assert_close

from lrpet_lightning.core import (
    FactorizedConv,
    FactorizedLinear,
    decompose_,
    decomposed_ranks,
    project_low_rank_,
    recompose_,
)
from lrpet_lightning.core.linalg import bn_scale, project_matrix, rank_from_ratio, weight_to_matrix
from lrpet_lightning.core.trace import trace_bn_pairs
from lrpet_lightning.core.walk import CONV_TYPES, TargetLayer
from lrpet_lightning.models import resnet20, resnet56

RATIO = 0.5


# ----------------------------------------------------------------------------- helpers
def _matrix_rank(weight: Tensor, rtol: float = 1e-5) -> int:
    s = torch.linalg.svdvals(weight_to_matrix(weight.detach()).double())
    return int((s > rtol * s[0]).sum())


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters (one negative
    gamma per BN), so that pairing a conv with the wrong BN changes the result."""
    g = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, _BatchNorm):
            n = bn.num_features
            with torch.no_grad():
                bn.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                if bn.affine:
                    bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    bn.weight[0] = -bn.weight[0]
                    bn.bias.copy_(0.1 * torch.randn(n, generator=g))


def _warm_bn(model: nn.Module, x: Tensor, steps: int = 3) -> None:
    """A few train-mode forwards under no_grad give BN real running statistics."""
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(x * (1 + 0.5 * i) + 0.1 * i)
    model.eval()


@torch.no_grad()
def _expected_projection(module: nn.Module, rank: int, bn: _BatchNorm | None) -> Tensor:
    """The weight the method (docs/method.md) gives for ``module``, computed by hand from linalg."""
    w = module.weight.detach()
    compute = torch.float64 if w.dtype == torch.float64 else torch.float32
    scale = None if bn is None else bn_scale(bn.running_var, bn.eps, bn.weight)
    M = weight_to_matrix(w).to(compute)
    return project_matrix(M, rank, scale=scale).matrix.reshape(w.shape).to(w.dtype)


@torch.no_grad()
def _eval_out(model: nn.Module, x: Tensor) -> Tensor:
    return model.eval()(x)


def _rel_err(y0: Tensor, y1: Tensor) -> float:
    return float((y0 - y1).norm() / y0.norm())


def _targets(model: nn.Module, include_linear: bool = False) -> dict[str, nn.Module]:
    kinds = (*CONV_TYPES, nn.Linear) if include_linear else CONV_TYPES
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


# ------------------------------------------------------------------------ layer table
@dataclass(frozen=True)
class LayerSpec:
    make: Callable[[bool], nn.Module]  # bias -> layer
    bn: Callable[[int], _BatchNorm]
    input_shape: tuple[int, ...]


LAYERS = {
    "conv3x3": LayerSpec(lambda b: nn.Conv2d(6, 12, 3, padding=1, bias=b), nn.BatchNorm2d,
                         (2, 6, 9, 9)),
    "conv1x1": LayerSpec(lambda b: nn.Conv2d(12, 8, 1, bias=b), nn.BatchNorm2d, (2, 12, 5, 5)),
    "strided": LayerSpec(lambda b: nn.Conv2d(6, 12, 3, stride=2, padding=1, bias=b),
                         nn.BatchNorm2d, (2, 6, 9, 9)),
    "dilated": LayerSpec(lambda b: nn.Conv2d(6, 12, 3, dilation=2, padding=2, bias=b),
                         nn.BatchNorm2d, (2, 6, 9, 9)),
    "circular": LayerSpec(lambda b: nn.Conv2d(6, 12, 3, padding=1, padding_mode="circular",
                                              bias=b), nn.BatchNorm2d, (2, 6, 9, 9)),
    "conv1d": LayerSpec(lambda b: nn.Conv1d(6, 12, 3, padding=1, bias=b), nn.BatchNorm1d,
                        (2, 6, 11)),
    "conv3d": LayerSpec(lambda b: nn.Conv3d(4, 8, 3, padding=1, bias=b), nn.BatchNorm3d,
                        (2, 4, 5, 5, 5)),
    "linear": LayerSpec(lambda b: nn.Linear(20, 12, bias=b), nn.BatchNorm1d, (4, 20)),
}


def _single(kind: str, bias: bool, with_bn: bool, seed: int = 0) -> tuple[nn.Sequential, Tensor]:
    """``Sequential(layer[, bn])`` with random BN statistics, and an input for it."""
    torch.manual_seed(seed)
    spec = LAYERS[kind]
    layer = spec.make(bias)
    n_out = layer.weight.shape[0]
    model = nn.Sequential(layer, spec.bn(n_out)) if with_bn else nn.Sequential(layer)
    _randomize_bn(model, seed)
    return model, torch.randn(spec.input_shape)


LAYER_CASES = [
    pytest.param(kind, bias, with_bn, id=f"{kind}-{'bias' if bias else 'nobias'}-"
                                         f"{'bn' if with_bn else 'nobn'}")
    for kind in LAYERS for bias in (True, False) for with_bn in (True, False)
]


# ------------------------------------------------------------------ one-layer projection
@pytest.mark.parametrize(("kind", "bias", "with_bn"), LAYER_CASES)
def test_project_one_layer(kind: str, bias: bool, with_bn: bool) -> None:
    model, x = _single(kind, bias, with_bn)
    layer = model[0]
    weight, bias_param = layer.weight, layer.bias
    bias_before = None if bias_param is None else bias_param.detach().clone()
    full = min(weight.shape[0], weight[0].numel())
    rank = rank_from_ratio(full, RATIO)
    expected = _expected_projection(layer, rank, model[1] if with_bn else None)

    (record,) = project_low_rank_(model, rank_ratio=RATIO, include_linear=True,
                                  example_inputs=x)

    assert (record.name, record.rank, record.full_rank) == ("0", rank, full)
    assert record.skipped is None
    assert record.bn_rectified is with_bn  # rectified exactly when a BN consumes the output
    # Written in place: same Parameter objects, so optimizers keep their references.
    assert layer.weight is weight and layer.bias is bias_param
    assert weight.dtype == torch.float32
    assert _matrix_rank(weight) == rank
    assert_close(weight.detach(), expected)
    if bias_before is not None:  # conv biases are left alone
        assert torch.equal(layer.bias.detach(), bias_before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_projection_keeps_param_dtype(dtype: torch.dtype) -> None:
    model, x = _single("conv3x3", True, True)
    model.to(dtype)
    layer, bn = model[0], model[1]
    weight = layer.weight
    # float64 is projected in float64; bf16 has no SVD kernels: projected in float32,
    # then rounded once into the bf16 parameter.
    expected = _expected_projection(layer, 6, bn)
    project_low_rank_(model, rank_ratio=RATIO, example_inputs=x.to(dtype), svd_method="exact")
    assert layer.weight is weight and weight.dtype == dtype
    assert torch.equal(weight.detach(), expected)
    if dtype == torch.float64:
        assert _matrix_rank(weight, rtol=1e-10) == 6


# -------------------------------------------------------------------------- BN pairing
class _SwappedBN(nn.Module):
    """BNs registered in the opposite order to their use, and an unused BN registered right
    after conv_b: pairing by module order would get every conv wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_b = nn.BatchNorm2d(8)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 8, 3, padding=1)
        self.bn_unused = nn.BatchNorm2d(8)
        self.conv_c = nn.Conv2d(8, 8, 1)  # feeds no BN

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn_a(self.conv_a(x)))
        x = torch.relu(self.bn_b(self.conv_b(x)))
        return self.conv_c(x)


def _check_pairs(model: nn.Module, x: Tensor, expected: dict[str, str | None]) -> None:
    """Project the layers named in ``expected`` at RATIO and check that each one was
    rectified by exactly the BN named (None: not rectified)."""
    modules = dict(model.named_modules())
    wanted = {}
    for name, bn_name in expected.items():
        bn = modules[bn_name] if bn_name else None
        rank = rank_from_ratio(min(modules[name].weight.shape[0],
                                   modules[name].weight[0].numel()), RATIO)
        wanted[name] = _expected_projection(modules[name], rank, bn)
    records = project_low_rank_(model, rank_ratio=RATIO, example_inputs=x, include=list(expected))
    records = {r.name: r for r in records}
    for name, bn_name in expected.items():
        assert records[name].bn_rectified is (bn_name is not None), name
        assert_close(modules[name].weight.detach(), wanted[name], msg=name)


def test_bn_pairing_follows_data_flow_not_registration_order() -> None:
    model = _SwappedBN()
    _randomize_bn(model)
    x = torch.randn(2, 3, 8, 8)
    layers = [TargetLayer(n, m, 1, 1) for n, m in _targets(model).items()]
    pairs = trace_bn_pairs(model, layers, x)
    assert {k: v[0] for k, v in pairs.items()} == {"conv_a": "bn_a", "conv_b": "bn_b"}
    _check_pairs(model, x, {"conv_a": "bn_a", "conv_b": "bn_b", "conv_c": None})


def test_inplace_op_between_conv_and_bn_is_not_a_pair() -> None:
    # ReLU(inplace=True) hands the BN the very tensor object the conv returned, modified.
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    _randomize_bn(model)
    _check_pairs(model, torch.randn(2, 3, 9, 9), {"0": None, "3": "4"})


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.bn1(y) + self.bn2(y)


def test_conv_feeding_two_bns_is_not_rectified() -> None:
    model = _TwoHeads()
    with pytest.warns(UserWarning, match="conv: feeds several BatchNorms"):
        (record,) = project_low_rank_(model, rank_ratio=RATIO,
                                      example_inputs=torch.randn(2, 3, 6, 6))
    assert not record.bn_rectified


def test_torchvision_resnet18_pairs_downsample_bns() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    _randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    expected: dict[str, str] = {}
    for name in _targets(model):
        if name.endswith("downsample.0"):
            expected[name] = name[:-1] + "1"
        else:  # conv1 -> bn1, layerX.Y.conv2 -> layerX.Y.bn2
            expected[name] = name.replace("conv", "bn")
    assert sum(n.endswith("downsample.0") for n in expected) == 3
    layers = [TargetLayer(n, m, 1, 1) for n, m in _targets(model).items()]
    assert {k: v[0] for k, v in trace_bn_pairs(model, layers, x).items()} == expected
    # The numbers on a subset: the 512x4608 SVDs of layer4 would dominate the suite.
    subset = ["conv1", "layer1.0.conv1", "layer2.0.conv2",
              *[n for n in expected if "downsample" in n]]
    _check_pairs(model, x, {n: expected[n] for n in subset})


def _tiny_densenet() -> nn.Module:
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                       num_classes=10)


def test_densenet_bn_before_conv_gets_no_rectification() -> None:
    # DenseNet layers are BN -> ReLU -> conv: conv2's output is concatenated and normalised
    # by the next layer's norm1 as part of a bigger tensor, so it has no BN of its own.
    model = _tiny_densenet()
    _randomize_bn(model)
    expected: dict[str, str | None] = {"features.conv0": "features.norm0",
                                       "features.transition1.conv": None}
    for block in ("denseblock1", "denseblock2"):
        for layer in ("denselayer1", "denselayer2"):
            prefix = f"features.{block}.{layer}"
            expected[f"{prefix}.conv1"] = f"{prefix}.norm2"
            expected[f"{prefix}.conv2"] = None
    assert set(expected) == set(_targets(model))
    _check_pairs(model, torch.randn(2, 3, 32, 32), expected)


def test_without_example_inputs_warns_and_skips_rectification() -> None:
    model = resnet20()
    with pytest.warns(UserWarning, match="example_inputs is None"):
        records = project_low_rank_(model, rank_ratio=RATIO)
    assert records and not any(r.bn_rectified for r in records)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # opting out explicitly is silent
        project_low_rank_(model, rank_ratio=RATIO, bn_rectification=False)


def test_projection_restores_mode_and_bn_statistics() -> None:
    model = resnet20().train()
    _randomize_bn(model)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    project_low_rank_(model, rank_ratio=RATIO, example_inputs=torch.randn(2, 3, 32, 32))
    assert all(m.training for m in model.modules())
    for k, v in stats.items():  # the tracing pass runs in eval mode
        assert torch.equal(model.state_dict()[k], v), k


# ------------------------------------------------------------------------ selection
def test_grouped_convs_are_skipped_with_a_warning() -> None:
    model = torchvision.models.mobilenet_v2(num_classes=10)
    grouped = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert len(grouped) == 17
    with pytest.warns(UserWarning, match=f"leaves {len(grouped)} layer") as caught:
        records = project_low_rank_(model, rank_ratio=RATIO,
                                    example_inputs=torch.randn(2, 3, 32, 32))
    text = "\n".join(str(w.message) for w in caught)
    assert all(f"{name}: grouped conv" in text for name in grouped)
    assert not set(grouped) & {r.name for r in records}
    assert len(records) == len(_targets(model)) - len(grouped)
    modules = dict(model.named_modules())
    for name, w in grouped.items():
        assert torch.equal(modules[name].weight.detach(), w), name


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ("layer1.*", None, {f"layer1.{b}.conv{c}" for b in range(3) for c in (1, 2)}),
        (["conv1", "layer3.2.*"], None, {"conv1", "layer3.2.conv1", "layer3.2.conv2"}),
        ("layer3.*", "*.conv2", {"layer3.0.conv1", "layer3.1.conv1", "layer3.2.conv1"}),
        (None, ["layer1.*", "layer2.*", "layer3.*"], {"conv1"}),
    ],
)
def test_include_exclude_patterns(include, exclude, expected: set[str]) -> None:
    model = resnet20()
    before = {n: m.weight.detach().clone() for n, m in _targets(model).items()}
    records = project_low_rank_(model, rank_ratio=RATIO, include=include, exclude=exclude,
                                bn_rectification=False)
    assert {r.name for r in records} == expected
    for name, module in _targets(model).items():  # the others are untouched
        assert torch.equal(module.weight.detach(), before[name]) is (name not in expected)


def test_ranks_overrides() -> None:
    model = resnet20()
    ranks = {"layer1.*": 0.25, "layer1.0.conv1": 3, "layer3.*.conv2": 10, "layer2.0.conv1": 999}
    records = {r.name: r for r in project_low_rank_(model, rank_ratio=RATIO, ranks=ranks,
                                                    bn_rectification=False)}
    assert records["layer1.0.conv1"].rank == 3  # the exact name beats the earlier pattern
    assert records["layer1.1.conv2"].rank == 4  # ratio 0.25 of 16
    assert records["layer3.2.conv2"].rank == 10  # absolute rank
    assert records["layer3.2.conv1"].rank == 32  # rank_ratio of 64
    assert records["conv1"].rank == 8
    # An absolute rank above the full rank is clamped to it, and that layer is left alone.
    assert records["layer2.0.conv1"].rank == 32
    assert records["layer2.0.conv1"].skipped == "rank >= full rank"
    assert _matrix_rank(model.layer1[0].conv1.weight) == 3
    assert _matrix_rank(model.layer3[2].conv2.weight) == 10


def test_ranks_without_rank_ratio_targets_only_named_layers() -> None:
    model = resnet20()
    records = project_low_rank_(model, ranks={"layer2.*.conv1": 4}, bn_rectification=False)
    assert {r.name: r.rank for r in records} == {f"layer2.{b}.conv1": 4 for b in range(3)}


def test_nan_layer_is_skipped_and_others_projected() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3))
    with torch.no_grad():
        model[2].weight[1, 2, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="2 has NaN/Inf"):
        records = project_low_rank_(model, rank_ratio=RATIO, bn_rectification=False)
    assert [r.skipped for r in records] == [None, "non-finite values", None]
    assert torch.isnan(model[2].weight).sum() == 1
    assert _matrix_rank(model[0].weight) == 4 and _matrix_rank(model[4].weight) == 4


def test_all_zero_layer_is_skipped() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    nn.init.zeros_(model[0].weight)
    records = project_low_rank_(model, rank_ratio=RATIO, bn_rectification=False)
    assert [r.skipped for r in records] == ["all-zero layer", None]
    assert not model[0].weight.any()


@pytest.mark.parametrize("scale", [1e-7, 1e-5, 0.3, 3.0])
def test_a_small_layer_is_projected_as_its_scaled_copy_is(scale: float) -> None:
    """The reference skips a layer whose top singular value is below 1e-4: absolute, so a
    small but full-rank layer stayed full rank while the reports counted it at rank r.
    Now it is projected like the same layer scaled by a power of two (exactly)."""
    import math

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16)).eval()
    with torch.no_grad():
        model[0].weight.mul_(scale / model[0].weight.norm())
        model[1].weight.uniform_(0.5, 2.0)
        model[1].running_var.uniform_(0.5, 2.0)
    norm = float(torch.linalg.matrix_norm(model[0].weight.reshape(16, -1)))
    power = 2.0 ** -math.floor(math.log2(norm)) if norm < 1 else 1.0
    big = copy.deepcopy(model)
    with torch.no_grad():
        big[0].weight.mul_(power)
    x = torch.randn(2, 8, 6, 6)
    (small_record,) = project_low_rank_(model, rank_ratio=0.25, example_inputs=x)
    (big_record,) = project_low_rank_(big, rank_ratio=0.25, example_inputs=x)
    assert small_record.skipped is None and small_record.bn_rectified
    assert torch.equal(model[0].weight * power, big[0].weight)
    assert small_record.kept_energy == big_record.kept_energy < 1
    s = torch.linalg.svdvals(model[0].weight.reshape(16, -1).double())
    assert s[4] < 1e-5 * s[0] and s[3] > 0.1 * s[0]  # rank 4 at any scale


# --------------------------------------------------------------------- decomposition
def _check_factorized(fact: nn.Module, dense: nn.Module, rank: int) -> None:
    """Shapes and settings the method (docs/method.md) prescribes for the two thin layers."""
    first, second = fact.first, fact.second
    assert type(first) is type(dense) and type(second) is type(dense)
    assert first.bias is None and fact.rank == rank
    if isinstance(dense, nn.Linear):
        assert isinstance(fact, FactorizedLinear)
        assert (first.in_features, first.out_features) == (dense.in_features, rank)
        assert (second.in_features, second.out_features) == (rank, dense.out_features)
    else:
        assert isinstance(fact, FactorizedConv)
        assert (first.in_channels, first.out_channels) == (dense.in_channels, rank)
        for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
            assert getattr(first, attr) == getattr(dense, attr), attr
        assert (second.in_channels, second.out_channels) == (rank, dense.out_channels)
        assert set(second.kernel_size) == {1} and set(second.stride) == {1}
    if dense.bias is None:
        assert second.bias is None
    else:  # the original bias moves to the second layer
        assert torch.equal(second.bias.detach(), dense.bias.detach())


@pytest.mark.parametrize(("kind", "bias", "with_bn"), LAYER_CASES)
def test_project_then_decompose_one_layer(kind: str, bias: bool, with_bn: bool) -> None:
    model, x = _single(kind, bias, with_bn)
    project_low_rank_(model, rank_ratio=RATIO, include_linear=True, example_inputs=x)
    dense = copy.deepcopy(model[0])
    y0 = _eval_out(model, x)
    ranks = decompose_(model, rank_ratio=RATIO, include_linear=True)
    rank = rank_from_ratio(min(dense.weight.shape[0], dense.weight[0].numel()), RATIO)
    assert ranks == {"0": rank} and decomposed_ranks(model) == ranks
    _check_factorized(model[0], dense, rank)
    # The dense-weight view of the factorized layer equals the projected weight.
    assert_close(model[0].weight, dense.weight.detach())
    assert _rel_err(y0, _eval_out(model, x)) < 1e-5


@pytest.mark.parametrize("kind", list(LAYERS))
def test_from_dense_to_dense_round_trip(kind: str) -> None:
    dense, x = _single(kind, True, False)
    layer = dense[0]
    rank = 3
    with torch.no_grad():  # a weight of rank exactly 3
        M = weight_to_matrix(layer.weight).double()
        projected = project_matrix(M, rank, energy_transfer=False).matrix
        layer.weight.copy_(projected.reshape(layer.weight.shape))
    fact_type = FactorizedLinear if isinstance(layer, nn.Linear) else FactorizedConv
    fact = fact_type.from_dense(layer, rank)
    _check_factorized(fact, layer, rank)
    assert_close(fact.weight, layer.weight.detach())
    assert fact.bias is fact.second.bias
    back = fact.to_dense()
    assert type(back) is type(layer)
    assert_close(back.weight.detach(), layer.weight.detach())
    assert torch.equal(back.bias.detach(), layer.bias.detach())
    with torch.no_grad():
        assert_close(fact(x), layer(x), rtol=1e-5, atol=1e-5)
        assert_close(back(x), layer(x), rtol=1e-5, atol=1e-5)


def test_layer_without_parameter_saving_stays_dense() -> None:
    # 1x1 16 -> 16 at rank 12: 12 * (16 + 16) = 384 >= 256 parameters.
    model = nn.Sequential(nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3))
    with pytest.warns(UserWarning, match="0: rank 12 of 16: factorizing would not save"):
        ranks = decompose_(model, rank_ratio=0.75)
    assert ranks == {"1": 12}
    assert type(model[0]) is nn.Conv2d and isinstance(model[1], FactorizedConv)


def test_decompose_infers_numerical_rank() -> None:
    model = resnet20()
    x = torch.randn(2, 3, 32, 32)
    _warm_bn(model, x)
    # Freshly initialised weights are full rank: nothing would save parameters.
    assert decompose_(copy.deepcopy(model)) == {}
    records = project_low_rank_(model, rank_ratio=0.25, example_inputs=x)
    y0 = _eval_out(model, x)
    assert decompose_(model) == {r.name: r.rank for r in records}
    assert _rel_err(y0, _eval_out(model, x)) < 1e-5


def test_decomposed_ranks_and_recompose() -> None:
    model = resnet20()
    x = torch.randn(2, 3, 32, 32)
    _warm_bn(model, x)
    project_low_rank_(model, rank_ratio=RATIO, example_inputs=x)
    projected = {n: m.weight.detach().clone() for n, m in _targets(model).items()}
    y0 = _eval_out(model, x)
    ranks = decompose_(model, rank_ratio=RATIO)
    assert decomposed_ranks(model) == ranks and len(ranks) == 19
    # The ranks rebuild the same thin architecture on a fresh model.
    fresh = resnet20()
    assert decompose_(fresh, ranks=ranks) == ranks
    assert {n: p.shape for n, p in fresh.state_dict().items()} == {
        n: p.shape for n, p in model.state_dict().items()}
    assert sorted(recompose_(model)) == sorted(ranks)
    assert decomposed_ranks(model) == {}
    for name, module in _targets(model).items():
        assert type(module) is nn.Conv2d
        assert_close(module.weight.detach(), projected[name], rtol=1e-5, atol=1e-6)
    assert _rel_err(y0, _eval_out(model, x)) < 1e-5


# --------------------------------------------------------------- function preservation
class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.BatchNorm1d(32),
                                  nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _vit() -> nn.Module:
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                               num_heads=2, hidden_dim=32, mlp_dim=64)
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # zero-initialised: output would be 0
    return vit


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


@dataclass(frozen=True)
class ModelCase:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    include_linear: bool = False
    # torchvision ResNet-18's 512x4608 layers take seconds of full SVD on 2 CPU cores;
    # the Gram solver (float64) gives the same projection in a fraction of that.
    svd_method: str = "exact"


IMAGE = (2, 3, 32, 32)
MODELS = {
    "cifar_resnet20": ModelCase(resnet20, IMAGE),
    "cifar_resnet56": ModelCase(resnet56, IMAGE),
    "tv_resnet18": ModelCase(lambda: torchvision.models.resnet18(num_classes=10), IMAGE,
                             svd_method="gram"),
    "tv_mobilenet_v2": ModelCase(lambda: torchvision.models.mobilenet_v2(num_classes=10), IMAGE),
    "tiny_densenet": ModelCase(_tiny_densenet, IMAGE),
    "mlp": ModelCase(_MLP, (4, 3, 4, 4), include_linear=True),
    "vit": ModelCase(_vit, IMAGE, include_linear=True),
}


# decompose_ factorizes with a full float64 SVD: ResNet-18's 512x4608 layers take seconds.
SLOW_MODELS = {"tv_resnet18"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n for n in MODELS]
)
def test_function_preserved_by_decomposition(name: str) -> None:
    case = MODELS[name]
    include_linear = case.include_linear
    torch.manual_seed(0)
    model, x = case.factory(), torch.randn(case.input_shape)
    _warm_bn(model, x)
    records = project_low_rank_(model, rank_ratio=RATIO, residual_scale=0.0,
                                include_linear=include_linear, example_inputs=x,
                                svd_method=case.svd_method)
    assert any(r.bn_rectified for r in records) is (name not in ("vit",))
    y0 = _eval_out(model, x)
    ranks = decompose_(model, rank_ratio=RATIO, include_linear=include_linear)
    assert ranks  # something was decomposed
    for rec in records:  # the decomposition ranks are the projection ranks
        assert ranks.get(rec.name, rec.rank) == rec.rank
    assert _rel_err(y0, _eval_out(model, x)) < 1e-5


def test_transformer_encoder_layers_stay_dense() -> None:
    # nn.TransformerEncoderLayer's fused inference path (eval, no_grad) reads linear1/2.weight
    # itself, as MultiheadAttention reads out_proj.weight: factorized, each read would rebuild
    # the dense matrix (more FLOPs than dense). They are named, and nothing is targeted.
    torch.manual_seed(0)
    model, x = _encoder().eval(), torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match=r"layers\.0\.linear1 \(its parent "
                                         r"TransformerEncoderLayer reads \.weight directly\)"):
        project_low_rank_(model, rank_ratio=RATIO, include_linear=True, example_inputs=x)
