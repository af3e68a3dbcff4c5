"""``prepare_for_inference``: same outputs, BatchNorm folded, input model untouched,
exportable; the latency-aware swap and the fold's safety rules on hand-made cases."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lrpet_lightning.core import FactorizedLayer, decompose_, decomposed_ranks, inference
from lrpet_lightning.core.inference import fold_batchnorms_, prepare_for_inference
from lrpet_lightning.models import build_model


def _randomize_bns_(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so a wrong fold shows."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)


def _decomposed(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name)
    with torch.no_grad():
        _randomize_bns_(model)
        decompose_(model, rank_ratio=0.4)
    return model.eval()


CASES = {"resnet20": (2, 3, 32, 32), "tv_resnet18": (2, 3, 64, 64)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(1)
    return _decomposed(request.param), torch.randn(CASES[request.param])


def _assert_same_outputs(prepared: nn.Module, model: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        expected, actual = model.eval()(x), prepared(x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("channels_last", ["auto", True, False])
def test_same_outputs_and_no_batchnorm_left(case, channels_last) -> None:
    model, x = case
    prepared = prepare_for_inference(model, x, channels_last=channels_last, repeats=1)
    _assert_same_outputs(prepared, model, x)
    # Every BatchNorm of these models follows a conv: none may be left.
    assert not [n for n, m in prepared.named_modules() if isinstance(m, _BatchNorm)]
    assert not prepared.training
    if channels_last is not True:
        return
    for m in prepared.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
            assert m.weight.is_contiguous(memory_format=torch.channels_last)


def test_input_model_untouched(case) -> None:
    model, x = case
    model.train()
    before = copy.deepcopy(model.state_dict())
    modules = [(n, type(m)) for n, m in model.named_modules()]
    prepare_for_inference(model, x, repeats=1)
    assert model.training
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
        assert after[key].is_contiguous(), key
    model.eval()


def test_latency_aware_false_keeps_every_factorized_layer(case) -> None:
    model, x = case
    prepared = prepare_for_inference(model, x, latency_aware=False, repeats=1)
    assert decomposed_ranks(prepared) == decomposed_ranks(model)


def test_layers_made_dense_when_dense_is_faster(case, monkeypatch) -> None:
    # Timing is noisy: pretend the dense form (each layer's second candidate) always wins.
    model, x = case
    monkeypatch.setattr(inference, "race", lambda fns, repeats: [1.0, 0.5] * (len(fns) // 2))
    prepared = prepare_for_inference(model, x, channels_last=True)
    assert decomposed_ranks(prepared) == {}
    _assert_same_outputs(prepared, model, x)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_export_and_trace(case) -> None:
    model, x = case
    prepared = prepare_for_inference(model, x, channels_last=True, repeats=1)
    with torch.no_grad():
        expected = prepared(x)
        traced = torch.jit.trace(prepared, x)
        torch.testing.assert_close(traced(x), expected)
    exported = torch.export.export(prepared, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), expected)


# ------------------------------------------------------------------------ fold safety
class _ConvBN(nn.Module):
    """conv -> BN, where the conv's output may also go elsewhere."""

    def __init__(self, reuse: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.reuse = reuse

    def forward(self, x: Tensor):
        y = self.conv(x)
        if self.reuse == "add":
            return self.bn(y) + y
        if self.reuse == "returned":
            return self.bn(y), y
        if self.reuse == "called_twice":
            return self.bn(y) + self.conv(x)
        return self.bn(y)


@pytest.mark.parametrize(("reuse", "folded"), [
    ("none", True), ("add", False), ("returned", False), ("called_twice", False),
])
def test_fold_only_when_nothing_else_sees_the_conv_output(reuse, folded) -> None:
    torch.manual_seed(0)
    model = _ConvBN(reuse)
    _randomize_bns_(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert fold_batchnorms_(model, x) == (["bn"] if folded else [])
        torch.testing.assert_close(model(x), expected)
    assert isinstance(model.bn, nn.Identity) == folded


def test_fold_factorized_conv_into_its_second_conv() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    _randomize_bns_(model)
    decompose_(model, rank_ratio=0.5)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert fold_batchnorms_(model, x) == ["1"]
        torch.testing.assert_close(model(x), expected)
    assert isinstance(model[0], FactorizedLayer) and model[0].first.bias is None
    assert isinstance(model[1], nn.Identity)


def test_fold_needs_eval_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorms_(model, torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"channels_last": "yes"}, ValueError,
     r"channels_last must be True, False or 'auto' \(measure both.*got 'yes'$"),
    ({"channels_last": 1}, TypeError, r"channels_last must be True, False or 'auto'.*got 1$"),
    ({"repeats": 0}, ValueError,
     r"repeats must be an int >= 1 \(timed runs per candidate\), got 0$"),
    ({"repeats": 1.5}, TypeError, r"repeats must be an int >= 1.*got 1\.5$"),
])
def test_bad_arguments(kwargs, error, match) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    with pytest.raises(error, match=match):
        prepare_for_inference(model, torch.randn(1, 3, 4, 4), **kwargs)
