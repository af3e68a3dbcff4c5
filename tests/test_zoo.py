"""The zoo: every public verb on models a user brings (timm, transformers, torchvision built
from configs, random init, nothing downloaded; hand-written odd ones). On each model every
weight matrix is either projected and really rank r as the forward sees it, or named with
its reason in the verb's warning; decomposition keeps the outputs; the report agrees with
the analytic cost; the compact model is never bigger; inference preparation keeps the
outputs; compact checkpoints round-trip; the compact model exports where the dense one does.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from zoo_models import ZOO, build, forward
from lrpet_lightning import (
    FactorizedLayer,
    compression_report,
    decompose_,
    load_compact,
    prepare_for_inference,
    project_low_rank_,
    save_compact,
)
from lrpet_lightning.core.inference import output_error
from lrpet_lightning.core.walk import CONV_TYPES, is_hf_conv1d, layer_matrix

pytest.importorskip("timm")
pytest.importorskip("transformers")

RATIO = 0.25
NAMES = sorted(ZOO)


def _weight_matrix_modules(model: nn.Module, include_linear: bool) -> dict[str, nn.Module]:
    """Every module holding a weight matrix the user could expect LRPET to look at."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, FactorizedLayer):
            continue
        linear = isinstance(m, nn.Linear) or is_hf_conv1d(m)
        if isinstance(m, (*CONV_TYPES, nn.RNNBase, nn.modules.conv._ConvTransposeNd)) or (
                include_linear and linear):
            out[name] = m
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            out[name] = m
    return out


def _run(fn, *args: Any, **kwargs: Any) -> tuple[Any, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, "\n".join(str(w.message) for w in caught)


def _rank(module: nn.Module) -> int:
    return int(torch.linalg.matrix_rank(layer_matrix(module).detach().double(), rtol=1e-5))


def _project(name: str, include_linear: bool):
    zoo = build(name)
    try:
        records, text = _run(project_low_rank_, zoo.model, rank_ratio=RATIO,
                             include_linear=include_linear, example_inputs=zoo.inputs)
    except ValueError as err:  # clearly refused: nothing targetable, every reason named
        assert "no layer of" in str(err), err
        return zoo, None, str(err)
    return zoo, records, text


@pytest.mark.parametrize("include_linear", [False, True], ids=["convs", "with_linear"])
@pytest.mark.parametrize("name", NAMES)
def test_every_weight_matrix_is_projected_or_named(name: str, include_linear: bool) -> None:
    zoo, records, text = _project(name, include_linear)
    modules = _weight_matrix_modules(zoo.model, include_linear)
    # An all-zero layer (torchvision's ViT head at init) is rank 0 <= r as it is.
    projected = {r.name: r for r in records or []
                 if r.skipped in (None, "all-zero layer", "rank >= full rank")}
    for record in projected.values():  # rank r as the forward sees the weight
        assert _rank(zoo.model.get_submodule(record.name)) <= record.rank, record.name
    for record in records or []:
        if record.skipped not in (None, "rank >= full rank", "all-zero layer"):
            assert record.name in text  # a fault is warned about
    aliases = {n: m for n, m in zoo.model.named_modules(remove_duplicate=False)}
    for mname, module in modules.items():
        names = [n for n, m in aliases.items() if m is module]
        assert any(n in projected or f"{n}:" in text or f"{n} (" in text for n in names), (
            f"{mname} ({type(module).__name__}) is neither projected nor named:\n{text}")


def _decomposed(name: str):
    """The zoo model projected (with Linears) and decomposed, with its dense twin."""
    zoo, records, _ = _project(name, include_linear=True)
    if records is None:
        return None
    dense = copy.deepcopy(zoo.model)
    ranks, text = _run(decompose_, zoo.model, rank_ratio=RATIO, include_linear=True,
                       example_inputs=zoo.inputs)
    assert "were not rank r" not in text, text
    return zoo, dense, ranks


@pytest.mark.parametrize("name", NAMES)
def test_decompose_keeps_outputs_and_the_report_is_exact(name: str) -> None:
    made = _decomposed(name)
    if made is None:
        pytest.skip("nothing targetable (the refusal is tested above)")
    zoo, dense, ranks = made
    with torch.no_grad():
        assert output_error(forward(zoo.model, zoo.inputs), forward(dense, zoo.inputs)) <= 1e-4
    report, _ = _run(compression_report, dense, zoo.model, zoo.inputs)
    assert report.compact_params <= report.dense_params
    assert report.compact_flops <= report.dense_flops
    assert report.dense_params == sum(p.numel() for p in dense.parameters())
    assert report.compact_params == sum(p.numel() for p in zoo.model.parameters())
    for row in report.layers:
        if row.rank is None:
            assert (row.compact_flops, row.compact_params) == (row.dense_flops, row.dense_params)
            continue
        assert ranks[row.name] == row.rank
        rows, cols = layer_matrix(dense.get_submodule(row.name)).shape
        bias = row.dense_params - rows * cols
        assert row.compact_params == row.rank * (rows + cols) + bias
        # FLOPs of a matrix product are proportional to its weight's size.
        assert row.compact_flops * rows * cols == row.dense_flops * row.rank * (rows + cols)


@pytest.mark.parametrize("name", NAMES)
def test_prepare_for_inference_keeps_outputs(name: str) -> None:
    made = _decomposed(name)
    zoo = build(name)
    models = [zoo.model] + ([made[0].model] if made is not None else [])
    for model in models:
        if name == "hw_legacy_weight_norm":  # the legacy hook's weight cannot be deep-copied
            with pytest.raises(ValueError, match="cannot be deep-copied"):
                prepare_for_inference(model, zoo.inputs)
            continue
        prepared, text = _run(prepare_for_inference, model, zoo.inputs, channels_last=True,
                              repeats=1)
        assert "computes something else" not in text, text
        with torch.no_grad():
            assert output_error(forward(prepared, zoo.inputs), forward(model, zoo.inputs)) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_compact_checkpoint_round_trips(name: str, tmp_path) -> None:
    made = _decomposed(name)
    if made is None or not made[2]:
        pytest.skip("nothing was decomposed")
    zoo = made[0]
    path = save_compact(zoo.model, tmp_path / "compact.pt")
    fresh, _ = _run(load_compact, build(name).model, path)
    with torch.no_grad():
        assert output_error(forward(fresh.eval(), zoo.inputs), forward(zoo.model, zoo.inputs)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_compact_model_exports_where_the_dense_one_does(name: str) -> None:
    made = _decomposed(name)
    if made is None or not made[2]:
        pytest.skip("nothing was decomposed")
    zoo, dense, _ = made
    args, kwargs = ((), zoo.inputs) if isinstance(zoo.inputs, dict) else ((zoo.inputs,), {})
    try:
        torch.export.export(dense, args, kwargs)
    except Exception as err:  # noqa: BLE001 - the dense model itself does not export
        pytest.skip(f"the dense model does not export: {type(err).__name__}")
    exported = torch.export.export(zoo.model, args, kwargs)
    with torch.no_grad():
        assert output_error(exported.module()(*args, **kwargs), forward(zoo.model, zoo.inputs)) \
            <= 1e-5


def test_gpt2_conv1d_layers_are_compressed_and_the_tie_is_kept() -> None:
    made = _decomposed("hf_gpt2")
    assert made is not None
    zoo, dense, ranks = made
    conv1d = [n for n, m in dense.named_modules() if is_hf_conv1d(m)]
    assert conv1d and set(conv1d) <= set(ranks)
    assert zoo.model.lm_head.weight is zoo.model.transformer.wte.weight
    assert sum(p.numel() for p in zoo.model.parameters()) < sum(p.numel()
                                                                for p in dense.parameters())
