"""``prepare_for_inference``: same outputs, BatchNorm folded, input model untouched,
exportable; the latency-aware swap and the fold's safety rules on hand-made cases."""

from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lrpet_lightning.core import FactorizedLayer, decompose_, decomposed_ranks, inference
from lrpet_lightning.core.factorized import factorized_type
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


def _fake_timer(layer_time, model_time=None):
    """A stand-in for ``inference.time_rounds`` (timing is noisy): each candidate — a layer
    form called on its activation, or a whole model run by ``run_forward`` — takes the time
    the given cost functions say, in every round. A whole model costs, by default, the sum
    of its layers' times."""
    def whole(model: nn.Module) -> float:
        total, factorized = 0.0, []
        for name, m in model.named_modules():
            if any(name.startswith(f + ".") for f in factorized):
                continue  # a thin conv of a factorized layer: counted with its layer
            if isinstance(m, FactorizedLayer):
                factorized.append(name)
            if isinstance(m, FactorizedLayer) or type(m) is nn.Conv2d:
                total += layer_time(m)
        return total

    def time_rounds(fns, repeats):
        times = []
        for fn in fns:
            if fn.func is inference.run_forward:
                t = (model_time or whole)(fn.args[0])
            else:
                t = layer_time(fn.func)
            times.append([t] * repeats)
        return times

    return time_rounds


def _form_time(module: nn.Module, *, factorized: float, padded: float, dense: float) -> float:
    if not isinstance(module, FactorizedLayer):
        return dense
    return padded if module.rank % inference.RANK_MULTIPLE == 0 else factorized


def test_layers_made_dense_when_dense_is_faster(case, monkeypatch) -> None:
    model, x = case
    cost = partial(_form_time, factorized=1.0, padded=0.8, dense=0.5)
    monkeypatch.setattr(inference, "time_rounds", _fake_timer(cost))
    prepared = prepare_for_inference(model, x, channels_last=True)
    assert decomposed_ranks(prepared) == {}
    _assert_same_outputs(prepared, model, x)


def test_ranks_padded_to_a_multiple_when_that_is_faster(case, monkeypatch) -> None:
    model, x = case
    assert any(r % inference.RANK_MULTIPLE for r in decomposed_ranks(model).values())
    cost = partial(_form_time, factorized=1.0, padded=0.8, dense=2.0)
    monkeypatch.setattr(inference, "time_rounds", _fake_timer(cost))
    prepared = prepare_for_inference(model, x, channels_last=True)
    ranks = decomposed_ranks(prepared)
    assert ranks.keys() == decomposed_ranks(model).keys()
    assert all(r % inference.RANK_MULTIPLE == 0 for r in ranks.values())
    _assert_same_outputs(prepared, model, x)


@pytest.mark.parametrize("fastest", ["factorized", "dense"])
def test_whole_model_check_overrules_the_layer_choices(case, monkeypatch, fastest) -> None:
    # The layers say "mix": dense wins where in and out widths agree. The whole-model race says a
    # uniform form is faster (as under load, where the per-layer times mislead).
    model, x = case

    def layer_time(module: nn.Module) -> float:
        if isinstance(module, FactorizedLayer):
            return 1.0
        return 0.5 if module.weight.shape[0] == module.weight.shape[1] else 2.0

    def model_time(m: nn.Module) -> float:
        n_factorized = len(decomposed_ranks(m))
        if fastest == "factorized":
            return 1.0 if n_factorized == len(decomposed_ranks(model)) else 2.0
        return 1.0 if n_factorized == 0 else 2.0

    monkeypatch.setattr(inference, "time_rounds", _fake_timer(layer_time, model_time))
    prepared = prepare_for_inference(model, x, channels_last=True)
    expected = decomposed_ranks(model) if fastest == "factorized" else {}
    assert decomposed_ranks(prepared) == expected
    _assert_same_outputs(prepared, model, x)


def test_whole_model_check_keeps_the_mix_when_it_is_fastest(case, monkeypatch) -> None:
    model, x = case

    def layer_time(module: nn.Module) -> float:
        if isinstance(module, FactorizedLayer):
            return 1.0
        return 0.5 if module.weight.shape[0] == module.weight.shape[1] else 2.0

    monkeypatch.setattr(inference, "time_rounds", _fake_timer(layer_time))
    prepared = prepare_for_inference(model, x, channels_last=True)
    ranks = decomposed_ranks(prepared)
    assert 0 < len(ranks) < len(decomposed_ranks(model))
    _assert_same_outputs(prepared, model, x)


def test_a_form_barely_faster_than_the_factorized_one_is_not_taken(case, monkeypatch) -> None:
    model, x = case
    margin = inference.FASTER_MARGIN
    cost = partial(_form_time, factorized=1.0, padded=1 - margin / 2, dense=1 - margin / 2)
    monkeypatch.setattr(inference, "time_rounds", _fake_timer(cost))
    prepared = prepare_for_inference(model, x, channels_last=True)
    assert decomposed_ranks(prepared) == decomposed_ranks(model)


@pytest.mark.parametrize(("times", "taken"), [
    ([0.5, 0.5, 0.5], True),
    ([0.5, 0.5, 5.0], True),   # one disturbed round: the median and the best still agree
    ([0.5, 5.0, 5.0], False),  # faster once (the best-of), not in the median
    ([0.97, 0.97, 0.97], False),  # within the margin
])
def test_clearly_faster_needs_the_median_and_the_best_of(times, taken) -> None:
    reference = [1.0, 1.0, 1.0]
    assert (inference._fastest([reference, times]) == 1) == taken


def test_time_rounds_interleaves_the_candidates() -> None:
    calls: list[str] = []
    times = inference.time_rounds([lambda: calls.append("a"), lambda: calls.append("b")], 3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then 3 timed ones
    assert [len(t) for t in times] == [3, 3]


def test_median_ratio_ignores_one_disturbed_round() -> None:
    # Round 2 of the candidate was hit by load: the median pairs it away.
    assert inference.median_ratio([1.0, 50.0, 1.1], [2.0, 2.0, 2.0]) == pytest.approx(0.55)


@pytest.mark.parametrize("layer", [
    nn.Conv2d(6, 12, 3, padding=1), nn.Conv2d(10, 12, 1, bias=False),
    nn.Conv2d(6, 12, 3, stride=2, dilation=2, padding=2), nn.Conv1d(6, 12, 3),
    nn.Linear(10, 12), nn.Linear(10, 12, bias=False),
], ids=["conv3x3", "conv1x1-nobias", "strided-dilated", "conv1d", "linear", "linear-nobias"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pad_rank_is_exact(layer, channels_last) -> None:
    torch.manual_seed(0)
    factorized = factorized_type(layer).from_dense(layer, 3)
    padded = inference.pad_rank(factorized, 8)
    assert padded.rank == 8 and type(padded) is type(factorized)
    c = layer.weight.shape[1]  # (the padded rank 8 is at most the full rank)
    x = torch.randn(2, c, 9, 9) if isinstance(layer, nn.Conv2d) else (
        torch.randn(2, c, 9) if isinstance(layer, nn.Conv1d) else torch.randn(2, c))
    if channels_last and x.dim() == 4:
        padded.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(padded(x), factorized(x))
        torch.testing.assert_close(padded.dense_weight(), factorized.dense_weight())
    assert inference.pad_rank(padded, 8).rank == 8  # already a multiple: unchanged rank


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


def _pointwise_model() -> nn.Module:
    """Two 1x1 stride-1 convs (each with a BN) that :class:`GemmFactorizedConv` can run,
    between a 3x3 and a strided 1x1 that it cannot."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
        nn.Conv2d(24, 16, 1, stride=2), nn.Flatten(), nn.LazyLinear(5),
    )
    model(torch.randn(1, 3, 8, 8))
    with torch.no_grad():
        _randomize_bns_(model)
        decompose_(model, rank_ratio=0.4)
    return model.eval()


@pytest.mark.parametrize("channels_last", [False, True])
def test_gemm_form_is_exact(channels_last) -> None:
    torch.manual_seed(0)
    pair = factorized_type(nn.Conv2d(16, 32, 1)).from_dense(nn.Conv2d(16, 32, 1), 5)
    x = torch.randn(3, 16, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gemm = inference.GemmFactorizedConv.of(pair)
    torch.testing.assert_close(gemm(x), pair(x), rtol=1e-5, atol=1e-6)
    assert gemm.rank == pair.rank and gemm.state_dict().keys() == pair.state_dict().keys()


@pytest.mark.parametrize("conv", [
    nn.Conv2d(16, 32, 3), nn.Conv2d(16, 32, 1, stride=2), nn.Conv2d(16, 32, 1, padding=1),
    nn.Conv1d(16, 32, 1),
], ids=["3x3", "strided", "padded", "conv1d"])
def test_gemm_form_refuses_what_it_does_not_compute(conv) -> None:
    pair = factorized_type(conv).from_dense(conv, 4)
    assert not inference.is_pointwise_pair(pair)
    with pytest.raises(ValueError, match="layer must be a FactorizedConv of a 1x1"):
        inference.GemmFactorizedConv.of(pair)


def test_gemm_form_taken_where_it_is_fastest_and_the_mix_raced(monkeypatch) -> None:
    model, x = _pointwise_model(), torch.randn(2, 3, 8, 8)
    pointwise = [n for n, m in model.named_modules() if inference.is_pointwise_pair(m)]
    assert len(pointwise) == 2  # the 3x3 and the strided 1x1 are not
    raced: list[list[tuple]] = []

    def layer_time(module: nn.Module) -> float:
        if isinstance(module, inference.GemmFactorizedConv):
            return 0.3
        return 1.0 if isinstance(module, FactorizedLayer) else 2.0

    def time_rounds(fns, repeats):
        if fns[0].func is inference.run_forward:  # the whole-model race: the mix wins
            raced.append([inference._layer_forms(fn.args[0]) for fn in fns])
            return [[2.0] * repeats] * (len(fns) - 1) + [[1.0] * repeats]
        return [[layer_time(fn.func)] * repeats for fn in fns]

    monkeypatch.setattr(inference, "time_rounds", time_rounds)
    prepared = prepare_for_inference(model, x, channels_last=True)
    assert len(raced) == 1 and len(raced[0]) == 3  # all factorized, all dense, the mix
    gemm = [n for n, m in prepared.named_modules()
            if isinstance(m, inference.GemmFactorizedConv)]
    assert gemm == pointwise
    assert decomposed_ranks(prepared) == decomposed_ranks(model)
    _assert_same_outputs(prepared, model, x)


def _hand_built_pairs() -> dict[str, nn.Module]:
    """Factorized convs built by hand, not by decompose_: what pad_rank and the matrix
    products must not take for plain pairs."""
    from lrpet_lightning.core.factorized import FactorizedConv

    torch.manual_seed(0)
    return {
        "grouped-first": FactorizedConv(nn.Conv2d(16, 6, 3, groups=2, bias=False),
                                        nn.Conv2d(6, 32, 1)),
        "biased-first": FactorizedConv(nn.Conv2d(16, 6, 1), nn.Conv2d(6, 32, 1)),
        "grouped-second": FactorizedConv(nn.Conv2d(16, 6, 1, bias=False),
                                         nn.Conv2d(6, 32, 1, groups=2)),
        "weight-norm": FactorizedConv(
            nn.utils.parametrizations.weight_norm(nn.Conv2d(16, 6, 1, bias=False)),
            nn.Conv2d(6, 32, 1)),
    }


@pytest.mark.parametrize("name", sorted(_hand_built_pairs()))
def test_pairs_that_are_not_plain_are_refused_or_left_alone(name: str) -> None:
    layer = _hand_built_pairs()[name]
    assert not inference.is_plain_pair(layer) and not inference.is_pointwise_pair(layer)
    with pytest.raises(ValueError, match="plain thin layers"):
        inference.pad_rank(layer, 8)
    with pytest.raises(ValueError, match="layer must be a FactorizedConv of a 1x1"):
        inference.GemmFactorizedConv.of(layer)
    net = nn.Sequential(layer)
    assert inference.pad_ranks(net, 8) is net  # left as it is: same outputs


def test_gemm_form_checks_its_layer_and_takes_unbatched_inputs() -> None:
    from lrpet_lightning.core.factorized import FactorizedConv

    with pytest.raises(ValueError, match="layer must be a FactorizedConv of a 1x1"):
        inference.GemmFactorizedConv.from_dense(nn.Conv2d(16, 32, 1, stride=2), 4)
    pair = FactorizedConv.from_dense(nn.Conv2d(16, 32, 1), 4)
    gemm = inference.GemmFactorizedConv.of(pair)
    x = torch.randn(16, 5, 7)  # (C, H, W), as Conv2d takes it
    torch.testing.assert_close(gemm(x), pair(x))


def test_gemm_form_not_offered_where_a_thin_conv_has_a_hook(monkeypatch) -> None:
    # The matrix products never call the thin convs: a hook there (feature extraction)
    # would silently stop running.
    model, x = _pointwise_model(), torch.randn(2, 3, 8, 8)
    seen = []
    hooked = next(m for m in model.modules() if inference.is_pointwise_pair(m))
    hooked.first.register_forward_hook(lambda m, i, o: seen.append(o.shape))

    def layer_time(module: nn.Module) -> float:
        return 0.1 if isinstance(module, inference.GemmFactorizedConv) else 1.0

    monkeypatch.setattr(inference, "time_rounds", _fake_timer(layer_time))
    prepared = prepare_for_inference(model, x, channels_last=True)
    gemm = [m for m in prepared.modules() if isinstance(m, inference.GemmFactorizedConv)]
    assert len(gemm) == 1  # the other pointwise pair only
    seen.clear()
    prepared(x)
    assert len(seen) == 1


# ------------------------------------------------------------------------ hooks
class _Wrapped(nn.Module):
    """conv -> BN, the conv inside a wrapper module (as a block is), for hooks on each."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.block(x))


@pytest.mark.parametrize(("hooked", "kind", "folded"), [
    ("block.0", "forward", False), ("block", "forward", False), ("bn", "pre", False),
    ("bn", "forward", False), ("", "forward", True),  # the root holds both: it sees no change
])
def test_no_fold_where_a_hook_would_see_the_change(hooked, kind, folded) -> None:
    torch.manual_seed(0)
    model = _Wrapped()
    _randomize_bns_(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    seen: list[Tensor] = []
    module = model.get_submodule(hooked)
    if kind == "pre":
        module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    else:
        module.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        model(x)
        before = seen.pop()
        assert fold_batchnorms_(model, x) == (["bn"] if folded else [])
        seen.clear()
        model(x)
    torch.testing.assert_close(seen[-1], before)  # the hook sees what it saw before


def test_a_hooked_factorized_layer_keeps_its_form(monkeypatch) -> None:
    model, x = _pointwise_model(), torch.randn(2, 3, 8, 8)
    hooked = next(n for n, m in model.named_modules() if inference.is_pointwise_pair(m))
    seen = []
    model.get_submodule(hooked).register_forward_hook(lambda m, i, o: seen.append(type(m)))
    cost = partial(_form_time, factorized=1.0, padded=0.5, dense=0.2)
    # The layers say dense, and so does the whole-model race: all but the hooked one go.
    monkeypatch.setattr(inference, "time_rounds", _fake_timer(cost))
    prepared = prepare_for_inference(model, x, channels_last=True)
    assert decomposed_ranks(prepared) == {hooked: decomposed_ranks(model)[hooked]}
    seen.clear()
    prepared(x)
    assert seen == [type(model.get_submodule(hooked))]
    _assert_same_outputs(prepared, model, x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gemm_form_gives_the_layout_a_conv_gives(channels_last) -> None:
    from lrpet_lightning.core.factorized import FactorizedConv

    gemm = inference.GemmFactorizedConv.of(FactorizedConv.from_dense(nn.Conv2d(16, 32, 1), 4))
    x = torch.randn(2, 16, 5, 7)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert gemm(x.contiguous(memory_format=fmt)).is_contiguous(memory_format=fmt)
    gemm(x).view(2, -1)  # code after a conv may view its output


# ------------------------------------------------------------------------ save, reload
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_prepared_model_saves_and_reloads(name, tmp_path, monkeypatch) -> None:
    from lrpet_lightning.core.checkpoint import load_compact, save_compact

    model, x = _decomposed(name), torch.randn(CASES[name])
    # A mix of forms: dense where in and out widths agree, padded where the rank is not
    # a multiple of 8, as it is elsewhere.
    def layer_time(module: nn.Module) -> float:
        if isinstance(module, FactorizedLayer):
            return 0.8 if module.rank % inference.RANK_MULTIPLE == 0 else 1.0
        return 0.5 if module.weight.shape[0] == module.weight.shape[1] else 2.0

    monkeypatch.setattr(inference, "time_rounds", _fake_timer(layer_time))
    prepared = prepare_for_inference(model, x, channels_last=True)
    assert 0 < len(decomposed_ranks(prepared)) < len(decomposed_ranks(model))
    assert not any(isinstance(m, _BatchNorm) for m in prepared.modules())
    save_compact(prepared, tmp_path / "prepared.pt")
    reloaded = load_compact(build_model(name), tmp_path / "prepared.pt").eval()
    assert decomposed_ranks(reloaded) == decomposed_ranks(prepared)
    assert not any(isinstance(m, _BatchNorm) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), prepared(x), rtol=1e-5, atol=1e-5)
    save_compact(reloaded, tmp_path / "again.pt")  # and again
    again = load_compact(build_model(name), tmp_path / "again.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), prepared(x), rtol=1e-5, atol=1e-5)


def test_reload_of_folded_batchnorms_names_another_architecture(tmp_path) -> None:
    from lrpet_lightning.core.checkpoint import load_compact, save_compact

    model, x = _decomposed("resnet20"), torch.randn(2, 3, 32, 32)
    prepared = prepare_for_inference(model, x, latency_aware=False, channels_last=False)
    save_compact(prepared, tmp_path / "prepared.pt")
    other = build_model("resnet20")
    other.bn1 = nn.ReLU()
    with pytest.raises(ValueError, match=r"BatchNorm 'bn1' folded into its conv, but "
                                         r"CifarResNet has ReLU there"):
        load_compact(other, tmp_path / "prepared.pt")


# ------------------------------------------------------------------------ what users bring
class _ViewsItsFeatures(nn.Module):
    """A LeNet-style head: ``.view`` of a conv's output, which fails on channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.fc(y.view(y.size(0), -1))


def test_channels_last_auto_keeps_contiguous_where_the_model_needs_it() -> None:
    torch.manual_seed(0)
    model, x = _ViewsItsFeatures().eval(), torch.randn(2, 3, 8, 8)
    prepared = prepare_for_inference(model, x, repeats=1)
    assert prepared.conv.weight.is_contiguous()
    _assert_same_outputs(prepared, model, x)
    with pytest.raises(ValueError, match=r"channels_last=True, but this _ViewsItsFeatures does "
                                         r"not run on channels_last tensors \(RuntimeError: view"):
        prepare_for_inference(model, x, channels_last=True, repeats=1)


def test_no_padding_past_the_full_rank() -> None:
    # A squeeze-excitation conv to 4 channels at rank 1: rank 8 would be more than dense,
    # and a compact file of it would not load (no rank-8 pair of a rank-4 matrix).
    from lrpet_lightning.core.factorized import FactorizedConv

    layer = FactorizedConv.from_dense(nn.Conv2d(96, 4, 1), 1)
    assert not inference.can_pad_rank(layer, 8) and inference.can_pad_rank(layer, 2)
    assert inference.pad_rank(layer, 4).rank == 4  # up to the full rank is fine
    with pytest.raises(ValueError, match=r"rank 1 padded to a multiple of 8 is 8, above the "
                                         r"full rank 4 of this FactorizedConv"):
        inference.pad_rank(layer, 8)
    net = nn.Sequential(layer, FactorizedConv.from_dense(nn.Conv2d(96, 32, 1), 3))
    padded = inference.pad_ranks(net, 8)
    assert [padded[0].rank, padded[1].rank] == [1, 8]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_prepared_and_a_wrong_fold_still_caught(dtype, monkeypatch) -> None:
    # Folding a BatchNorm in half precision rounds the outputs by about 2 eps: judged
    # against float32, the prepared model is as close as the model itself.
    model = _decomposed("resnet20").to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        prepared = prepare_for_inference(model, x, repeats=1, latency_aware=False,
                                         channels_last=False)
    assert not any(isinstance(m, _BatchNorm) for m in prepared.modules())

    fold = inference.fold_batchnorms_

    def wrong_fold(m: nn.Module, inputs) -> list[str]:
        names = fold(m, inputs)
        next(c for c in m.modules() if type(c) is nn.Conv2d).weight.data *= 1.5
        return names

    monkeypatch.setattr(inference, "fold_batchnorms_", wrong_fold)
    with pytest.warns(RuntimeWarning, match="computes something else"):
        kept = prepare_for_inference(model, x, repeats=1, latency_aware=False,
                                     channels_last=False)
    assert isinstance(kept.bn1, _BatchNorm)


def test_a_prepared_model_made_all_dense_saves_and_reloads(tmp_path, monkeypatch) -> None:
    # Dense can time faster everywhere (it did in CI, under load): still a model to save.
    from lrpet_lightning.core.checkpoint import load_compact, save_compact

    model, x = _decomposed("resnet20"), torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(inference, "_fastest_model", lambda models, inputs, repeats: 1)
    prepared = prepare_for_inference(model, x, channels_last=False)
    assert decomposed_ranks(prepared) == {}
    save_compact(prepared, tmp_path / "dense.pt")
    reloaded = load_compact(build_model("resnet20"), tmp_path / "dense.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), prepared(x), rtol=1e-5, atol=1e-5)
    save_compact(reloaded, tmp_path / "again.pt")
    with pytest.raises(ValueError, match="has no factorized layer"):  # a plain dense model
        save_compact(build_model("resnet20"), tmp_path / "plain.pt")


class _BreaksGraph(nn.Module):
    """A conv -> BN block whose forward has a graph break (a print, a data-dependent branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        torch._dynamo.graph_break()
        return y.relu()


def test_prepare_for_inference_folds_inside_a_compiled_submodule_with_a_graph_break() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), _BreaksGraph())
    x = torch.randn(2, 3, 8, 8)
    model(x)  # some statistics
    model.eval()
    model[2] = torch.compile(model[2], backend="eager")
    y = model(x)
    prepared = prepare_for_inference(model, x)
    assert isinstance(prepared[1], nn.Identity)
    assert isinstance(prepared[2]._orig_mod.bn, nn.Identity)
    torch.testing.assert_close(prepared(x), y, rtol=1e-4, atol=1e-5)
