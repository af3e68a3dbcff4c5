"""Model support, one failure class per test: every layer is projected and really rank r as
the forward sees its weight, or named with its reason in the one warning a verb gives."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrpet_lightning import (
    FactorizedConv,
    FactorizedLinear,
    compression_report,
    decompose_,
    prepare_for_inference,
    project_low_rank_,
)
from lrpet_lightning.core import transforms


def _rank(w: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(w.detach().double().flatten(1), rtol=1e-6))


def _warned(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, "\n".join(str(w.message) for w in caught)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ reparametrized weights
class StdConv(nn.Conv2d):
    """A weight-standardized conv (as timm's StdConv2d): its forward rescales .weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (
            self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class PlainSubclass(nn.Conv3d):
    """A subclass with the base forward (as torchvision's Conv3DSimple)."""

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        return (stride, stride, stride)


def test_conv_with_its_own_forward_is_named_and_left_alone() -> None:
    model = nn.Sequential(StdConv(8, 16, 3), nn.Conv2d(16, 16, 3))
    before = model[0].weight.detach().clone()
    records, text = _warned(project_low_rank_, model, rank_ratio=0.25, bn_rectification=False)
    assert [r.name for r in records] == ["1"]
    assert "0: StdConv has its own forward" in text
    assert torch.equal(model[0].weight, before)


def test_plain_subclass_decomposes_into_plain_convs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(PlainSubclass(4, 8, 3))
    x = torch.randn(1, 4, 5, 6, 6)
    project_low_rank_(model, rank_ratio=0.5, bn_rectification=False)
    y = model(x)
    decompose_(model, rank_ratio=0.5)
    assert isinstance(model[0], FactorizedConv)
    assert type(model[0].first) is nn.Conv3d and type(model[0].second) is nn.Conv3d
    assert _rel(model(x), y) < 1e-5


@pytest.mark.parametrize("wrap", [
    lambda m: nn.utils.parametrizations.weight_norm(m),
    lambda m: nn.utils.parametrizations.spectral_norm(m),
    lambda m: nn.utils.weight_norm(m),  # the legacy hook
])
def test_parametrized_weight_is_named_not_reported_as_projected(wrap) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # legacy weight_norm is deprecated
        model = nn.Sequential(wrap(nn.Conv2d(8, 16, 3)), nn.Conv2d(16, 16, 3))
    records, text = _warned(project_low_rank_, model, rank_ratio=0.25, bn_rectification=False)
    assert [r.name for r in records] == ["1"]
    assert "0: weight is computed by a parametrization or a weight-norm hook" in text
    ranks, _ = _warned(decompose_, model, rank_ratio=0.25)
    assert list(ranks) == ["1"]  # the parametrized layer is never truncated


# ------------------------------------------------------------------ shared and tied weights
class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.again = self.block  # one module under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(torch.relu(self.block(x)))


def test_shared_module_stays_shared_after_decomposition() -> None:
    torch.manual_seed(0)
    model, x = Shared(), torch.randn(2, 8, 6, 6)
    project_low_rank_(model, rank_ratio=0.25, bn_rectification=False)
    y, params = model(x), sum(p.numel() for p in model.parameters())
    assert decompose_(model, rank_ratio=0.25) == {"block": 2}
    assert model.block is model.again and isinstance(model.block, FactorizedConv)
    assert sum(p.numel() for p in model.parameters()) < params
    assert _rel(model(x), y) < 1e-5


class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT-2's lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.embed(ids))))


def test_tied_head_is_named_and_its_embedding_untouched() -> None:
    model = TiedHead()
    embedding = model.embed.weight.detach().clone()
    records, text = _warned(project_low_rank_, model, rank_ratio=0.25, include_linear=True)
    assert [r.name for r in records] == ["mid"] and "head: weight tied to embed" in text
    assert torch.equal(model.embed.weight, embedding)
    params = sum(p.numel() for p in model.parameters())
    _warned(decompose_, model, rank_ratio=0.25, include_linear=True)
    assert model.head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) <= params


# -------------------------------------------------------------- weights read by the parent
class ReadsWeight(nn.Module):
    """Reads its child's weight in a functional call, as Swin or BEiT do."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = F.linear(x, self.qkv.weight, self.qkv.bias)[..., :16]
        return self.proj(q)


def test_weight_read_by_the_parent_is_detected_and_kept_dense() -> None:
    torch.manual_seed(0)
    model, x = ReadsWeight(), torch.randn(3, 16)
    records, text = _warned(project_low_rank_, model, rank_ratio=0.25, include_linear=True,
                            example_inputs=x)
    assert [r.name for r in records] == ["proj"]
    assert "qkv: its .weight is read outside its own forward" in text
    y = model(x)
    ranks, _ = _warned(decompose_, model, rank_ratio=0.25, include_linear=True, example_inputs=x)
    assert ranks == {"proj": 4} and type(model.qkv) is nn.Linear
    assert _rel(model(x), y) < 1e-5


def test_reading_a_factorized_weight_warns() -> None:
    layer = FactorizedLinear.from_dense(nn.Linear(16, 16), 4)
    with pytest.warns(RuntimeWarning, match="rebuilt from the thin pair"):
        assert layer.weight.shape == (16, 16)


# ---------------------------------------------------------------------- Hugging Face Conv1D
def test_hf_conv1d_is_projected_and_decomposed_like_a_linear() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    model = nn.Sequential(pytorch_utils.Conv1D(24, 16), nn.ReLU(), pytorch_utils.Conv1D(8, 24))
    x = torch.randn(3, 5, 16)
    records = project_low_rank_(model, rank_ratio=0.5, include_linear=True)
    assert [(r.name, r.rank, r.skipped) for r in records] == [("0", 8, None), ("2", 4, None)]
    assert _rank(model[0].weight) == 8 and _rank(model[2].weight) == 4
    y = model(x)
    assert decompose_(model, rank_ratio=0.5, include_linear=True) == {"0": 8, "2": 4}
    assert isinstance(model[0], FactorizedLinear) and model[0].in_features == 16
    assert _rel(model(x), y) < 1e-5


# ------------------------------------------------------------------------- zero-gamma BN
def test_zero_gamma_batchnorm_falls_back_to_the_plain_projection() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16))
    nn.init.zeros_(model[1].weight)  # timm's zero-init of a block's last BN
    (record,) = project_low_rank_(model, rank_ratio=0.25, example_inputs=torch.randn(2, 8, 6, 6))
    assert record.skipped is None and not record.bn_rectified
    assert _rank(model[0].weight) == 4


# ----------------------------------------------------------------- decompose_ is careful
def test_decompose_keeps_a_nan_layer_dense_and_decomposes_the_others() -> None:
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    ranks, text = _warned(decompose_, model, rank_ratio=0.25)
    assert ranks == {"1": 4} and type(model[0]) is nn.Conv2d
    assert "0: NaN/Inf weights: kept dense" in text


def test_decompose_keeps_a_hooked_layer_dense_and_names_it() -> None:
    """A thin pair would not run the hooks on the dense layer: its outputs would change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    project_low_rank_(model, rank_ratio=0.25, bn_rectification=False)
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    x = torch.randn(2, 8, 9, 9)
    before = model(x)
    ranks, text = _warned(decompose_, model, rank_ratio=0.25)
    assert ranks == {"1": 4} and type(model[0]) is nn.Conv2d
    assert "0: 1 forward/backward hook(s) registered on it" in text
    assert torch.allclose(model(x), before, atol=1e-5)


def test_a_forward_replaced_on_the_instance_is_named_and_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    conv = model[0]
    conv.forward = lambda x: F.conv2d(x, conv.weight.tanh(), conv.bias)
    before = conv.weight.detach().clone()
    records, text = _warned(project_low_rank_, model, rank_ratio=0.25, bn_rectification=False)
    assert [r.name for r in records] == ["1"]
    assert "0: its forward is replaced on the instance" in text
    assert torch.equal(conv.weight, before)
    ranks, _ = _warned(decompose_, model, rank_ratio=0.25)
    assert ranks == {"1": 4} and model[0] is conv


def test_loading_a_compact_state_dict_and_recomposing_keep_the_hooks() -> None:
    """match_architecture_ and recompose_ must swap the module: its hooks move with it."""
    from lrpet_lightning import match_architecture_, recompose_

    torch.manual_seed(0)
    compact = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    decompose_(compact, ranks={"0": 4, "1": 4})
    dense = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    seen: list[str] = []
    dense[0].register_forward_hook(lambda module, args, out: seen.append(type(module).__name__))
    _, text = _warned(match_architecture_, dense, compact.state_dict())
    assert "1 hook(s) of 0 carried over onto its FactorizedConv replacement" in text
    dense.load_state_dict(compact.state_dict())
    dense(torch.randn(1, 8, 9, 9))
    _, text = _warned(recompose_, dense)
    dense(torch.randn(1, 8, 9, 9))
    assert seen == ["FactorizedConv", "Conv2d"] and "onto its Conv2d replacement" in text


def test_decompose_names_low_rank_linears_it_leaves_dense_without_include_linear() -> None:
    """The callback projected the Linears (include_linear=True); a later decompose_(model)
    without it decomposes only the convs, and says which Linears it left."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.Linear(16 * 36, 32),
                          nn.Linear(32, 32))
    project_low_rank_(model, rank_ratio=0.25, include_linear=True, bn_rectification=False)
    ranks, text = _warned(decompose_, model)
    assert ranks == {"0": 4}
    assert "2 Linear layer(s) have low-rank weights" in text and ": 2, 3" in text
    _, text = _warned(decompose_, model, include_linear=True)
    assert "Linear layer(s) have low-rank weights" not in text
    assert isinstance(model[2], FactorizedLinear) and isinstance(model[3], FactorizedLinear)


def test_decompose_is_transactional(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    real = FactorizedConv.from_dense.__func__
    calls = []

    def interrupted(cls, conv, rank):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cls, conv, rank)

    monkeypatch.setattr(FactorizedConv, "from_dense", classmethod(interrupted))
    with pytest.raises(KeyboardInterrupt):
        decompose_(model, rank_ratio=0.25)
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.Conv2d


def test_projection_is_transactional(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    before = [p.detach().clone() for p in model.parameters()]
    real, calls = transforms._project_with_fallbacks, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(transforms, "_project_with_fallbacks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        project_low_rank_(model, rank_ratio=0.25, bn_rectification=False)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_decompose_warns_when_truncating_a_full_rank_layer_and_when_nothing_is_done() -> None:
    model = nn.Sequential(nn.Conv2d(8, 16, 3))
    with pytest.warns(UserWarning, match=r"were not rank r.*0 \(rank 4: weight changed by"):
        decompose_(model, rank_ratio=0.25)
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    with pytest.warns(UserWarning, match="no layer of Sequential was decomposed"):
        assert decompose_(model, rank_ratio=0.9) == {}


def test_min_rank_above_every_rank_is_said() -> None:
    model = nn.Sequential(nn.Conv2d(8, 16, 3))
    with pytest.warns(UserWarning, match="every targeted layer keeps its full rank"):
        project_low_rank_(model, rank_ratio=0.25, min_rank=100, bn_rectification=False)


def test_meta_model_rank_inference_says_what_is_wrong() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(8, 16, 3))
    with pytest.raises(ValueError, match="meta device"):
        decompose_(model)


def test_uninitialized_lazy_module_is_named() -> None:
    model = nn.Sequential(nn.LazyConv2d(16, 3), nn.Conv2d(16, 16, 3))
    records, text = _warned(project_low_rank_, model, rank_ratio=0.25, bn_rectification=False)
    assert [r.name for r in records] == ["1"] and "0: uninitialized lazy module" in text


def test_unsupported_weight_matrices_are_named_with_their_share() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(8, 8, 2)
            self.rnn = nn.LSTM(8, 8)
            self.conv = nn.Conv2d(8, 16, 3)

    _, text = _warned(project_low_rank_, Mixed(), rank_ratio=0.25, bn_rectification=False)
    assert "up: transposed conv (ConvTranspose2d): not supported" in text
    assert "rnn: recurrent layer (LSTM): not supported" in text and "% of parameters" in text


class OwnMatrices(nn.Module):
    """Weight matrices outside any Conv/Linear: a hand-written ``x @ self.weight.T``
    layer, an embedding, a Bilinear, and a matrix held by the model itself."""

    class MatMul(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))
            self.bias = nn.Parameter(torch.zeros(8))  # a vector: not a matrix

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T + self.bias

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.mm = self.MatMul()
        self.bilinear = nn.Bilinear(8, 8, 8)
        self.pos = nn.Parameter(torch.zeros(1, 4, 8))
        self.token = nn.Parameter(torch.zeros(1, 1, 8))  # one dimension above 1: no matrix
        self.fc = nn.Linear(8, 8)


def test_weight_matrices_of_other_modules_are_named() -> None:
    _, text = _warned(project_low_rank_, OwnMatrices(), rank_ratio=0.25, include_linear=True,
                      bn_rectification=False)
    assert "embed: embedding table (a lookup, not a matrix product)" in text
    assert "mm: MatMul computes with its own weight in its own forward" in text
    assert "bilinear: Bilinear computes with its own weight" in text
    assert "(model): OwnMatrices computes with its own pos in" in text, text
    assert "token" not in text and "bias" not in text and "  fc:" not in text
    share = 100 * 32 / sum(p.numel() for p in OwnMatrices().parameters())
    assert f"pos in its own forward: only Conv/Linear layers are projected; {share:.1f} %" in text


def test_parametrized_layer_is_named_once_not_again_for_its_parametrization() -> None:
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(weight_norm(nn.Conv2d(3, 8, 3)), nn.Conv2d(8, 8, 3))
    _, text = _warned(project_low_rank_, model, rank_ratio=0.25, bn_rectification=False)
    assert "0: weight is computed by a parametrization" in text
    assert "parametrizations" not in text and "ParametrizationList" not in text, text


# ------------------------------------------------------------------------ thin layers
def test_thin_layers_keep_conv_attributes_and_frozen_flags() -> None:
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    conv.weight.requires_grad_(False)
    thin = FactorizedConv.from_dense(conv, 4)
    assert (thin.in_channels, thin.out_channels, thin.kernel_size, thin.stride, thin.padding) \
        == (8, 16, (3, 3), (2, 2), (1, 1))
    assert not thin.first.weight.requires_grad and not thin.second.weight.requires_grad
    assert thin.second.bias.requires_grad
    dense = thin.to_dense()
    assert not dense.weight.requires_grad and dense.bias.requires_grad


# ------------------------------------------------------------------------ inference
class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm subclass that also applies an activation (timm's BatchNormAct2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_prepare_for_inference_leaves_batchnorm_subclasses_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct(8), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8)).eval()
    model[1].running_mean.normal_()
    x = torch.randn(2, 3, 10, 10)
    prepared = prepare_for_inference(model, x, channels_last=False, latency_aware=False)
    assert isinstance(prepared[1], BatchNormAct) and isinstance(prepared[3], nn.Identity)
    assert _rel(prepared(x), model(x)) < 1e-5


def test_prepare_for_inference_returns_the_model_unprepared_if_outputs_change(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from lrpet_lightning.core import inference

    def breaks(model, inputs):
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.mul_(2)
        return []

    monkeypatch.setattr(inference, "fold_batchnorms_", breaks)
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3)).eval(), torch.randn(1, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="computes something else"):
        prepared = prepare_for_inference(model, x, channels_last=False, latency_aware=False)
    assert torch.equal(prepared(x), model(x))


# ------------------------------------------------------------------------ the report
def test_report_names_what_it_cannot_count() -> None:
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(8, 16, 3)
            self.rnn = nn.LSTM(16, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(self.conv(x).permute(2, 0, 1))[0]

    dense, x = Recurrent(), torch.randn(1, 8, 12)
    compact = copy.deepcopy(dense)
    _warned(decompose_, compact, rank_ratio=0.25)
    with pytest.warns(UserWarning, match=r"1 module\(s\) holding .* could not be counted .*: rnn"):
        report = compression_report(dense, compact, x)
    assert not report.flops_fully_counted and set(report.uncounted) == {"rnn"}
    assert "FLOPs counted" in report.summary() and not report.to_dict()["flops_fully_counted"]


@pytest.mark.parametrize("features", [12, 16])  # 16: the BN's size matches by accident
def test_linear_pairs_with_a_batchnorm_only_on_its_feature_axis(features: int) -> None:
    # Linear on (B, 16, 20) then BatchNorm1d(16): the BN normalizes positions, not the
    # Linear's features, so it must not rectify the Linear's projection.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, features), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.Linear(features, 8)).eval()
    records = project_low_rank_(model, rank_ratio=0.25, include_linear=True,
                                example_inputs=torch.randn(2, 16, 20))
    first = records[0]
    assert first.skipped is None and not first.bn_rectified
    assert torch.linalg.matrix_rank(model[0].weight.detach()) == first.rank
    flat = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16)).eval()  # (B, F): paired
    (paired,) = project_low_rank_(flat, rank_ratio=0.25, include_linear=True,
                                  example_inputs=torch.randn(4, 20))
    assert paired.bn_rectified


def _caught(fn, *args, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [str(w.message) for w in caught]


def test_decompose_warns_once_per_call() -> None:
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3, groups=4),
                          nn.Conv2d(16, 8, 3))
    (message,) = _caught(decompose_, model, rank_ratio=0.25)  # skipped + not rank r: one
    assert "grouped conv" in message and "were not rank r" in message
    (nothing,) = _caught(decompose_, nn.Sequential(nn.Conv2d(4, 4, 1)),
                         rank_ratio=0.5)  # rank 2 of 4x4 saves nothing: kept dense
    assert "was decomposed" in nothing


def test_decompose_reading_ranks_off_the_weights_says_no_false_note() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    project_low_rank_(model, rank_ratio=0.25, bn_rectification=False)
    messages = _caught(decompose_, model)
    assert not any("nothing is compressed" in m for m in messages), messages


def test_decompose_in_bfloat16_after_projection_does_not_warn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3)).bfloat16()
    project_low_rank_(model, rank_ratio=0.25, bn_rectification=False)
    assert _caught(decompose_, model, rank_ratio=0.25) == []


def test_project_names_targeted_layers_it_leaves_as_they_are() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 1, 3), nn.Conv2d(1, 4, 1))
    nn.init.zeros_(model[0].weight)
    (message,) = _caught(project_low_rank_, model, rank_ratio=0.25, bn_rectification=False)
    assert "0: all-zero layer" in message and "1: rank >= full rank" in message


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prepare_for_inference_folds_half_precision_models(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 3)).eval()
    model[1].running_var.uniform_(0.5, 2.0)
    model[1].running_mean.normal_()
    model = model.to(dtype)
    x = torch.randn(2, 3, 12, 12, dtype=dtype)
    assert _caught(prepare_for_inference, model, x, latency_aware=False) == []
    prepared = prepare_for_inference(model, x, latency_aware=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())  # folded


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_decomposed_model_scripts_with_torchscript_without_a_false_weight_warning() -> None:
    # TorchScript compiles a module's properties and reads every attribute while it
    # compiles; the thin layers' conveniences (.weight, .stride, ...) are left out of the
    # compilation, and those reads are not the parent-reads-.weight the warning is about.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    x = torch.randn(2, 3, 8, 8)
    project_low_rank_(model, rank_ratio=0.5, include_linear=True, bn_rectification=False)
    decompose_(model, rank_ratio=0.5, include_linear=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scripted = torch.jit.script(model)
    assert not [w for w in caught if "LRPET" in str(w.message)]
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)
