"""MNIST-1D: the datamodule (splits, standardization, determinism, errors), the 1-D ResNet
with LRPET (every conv paired with its BN, decomposition keeps the projected outputs), and one
short run of the ``mnist1d_resnet1d`` preset through the app."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import TINY_RUN, compose
from torch import nn

from lrpet_lightning import compression_report, decompose_, project_low_rank_
from lrpet_lightning.app.data import MNIST1DDataModule
from lrpet_lightning.app.data.mnist1d import _generate
from lrpet_lightning.models import build_model, resnet1d

#: The data tests need the mnist1d extra; the model tests and the ImportError test do not.
needs_mnist1d = pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None,
                                   reason='the mnist1d extra is not installed')

#: The preset's rank ratio and the one its comment names for ~90 %, with the FLOPs reduction
#: compression_report counts for each on the default ResNet-14 at length 40.
FLOPS_AT = {0.15: 0.8036, 0.075: 0.9074}


@pytest.fixture(scope="module")
def mnist1d() -> MNIST1DDataModule:
    pytest.importorskip("mnist1d", reason="the mnist1d extra is not installed")
    dm = MNIST1DDataModule(batch_size=100)
    dm.setup("fit")
    return dm


def _raw() -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(np.array(a)) for a in _generate(42))


def _inputs(dataset: Any) -> torch.Tensor:
    return dataset.tensors[0]


# --- The datamodule ---------------------------------------------------------------------------

@needs_mnist1d
def test_shapes_and_sizes_are_set_before_setup() -> None:
    dm = MNIST1DDataModule()
    assert (dm.num_classes, dm.in_channels, dm.example_input_shape) == (10, 1, (1, 1, 40))
    assert dm.train_set is None and dm.class_names == [str(d) for d in range(10)]


def test_batches_are_float_sequences(mnist1d: MNIST1DDataModule) -> None:
    x, y = next(iter(mnist1d.train_dataloader()))
    assert x.shape == (100, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.long
    x, y = next(iter(mnist1d.test_dataloader()))
    assert x.shape == (100, 1, 40) and set(y.tolist()) <= set(range(10))


def test_val_split_is_taken_from_the_4000_training_sequences(mnist1d: MNIST1DDataModule) -> None:
    assert (len(mnist1d.train_set), len(mnist1d.val_set), len(mnist1d.test_set)) == \
        (3500, 500, 1000)
    train, val = mnist1d.split_indices["train"], mnist1d.split_indices["val"]
    assert sorted(torch.cat([train, val]).tolist()) == list(range(4000))
    x, y, x_test, y_test = _raw()
    scale = lambda t: ((t - mnist1d.mean) / mnist1d.std).float().unsqueeze(1)  # noqa: E731
    torch.testing.assert_close(_inputs(mnist1d.val_set), scale(x[val]))
    assert torch.equal(mnist1d.val_set.tensors[1], y[val])
    torch.testing.assert_close(_inputs(mnist1d.test_set), scale(x_test))
    assert torch.equal(mnist1d.test_set.tensors[1], y_test)


def test_standardized_with_training_split_statistics_only(mnist1d: MNIST1DDataModule) -> None:
    x = _raw()[0].double()
    train = x[mnist1d.split_indices["train"]]
    assert mnist1d.mean == pytest.approx(train.mean().item(), abs=1e-12)
    assert mnist1d.std == pytest.approx(train.std().item(), abs=1e-12)
    assert mnist1d.mean != pytest.approx(x.mean().item(), abs=1e-9)  # the val part is left out
    inputs = _inputs(mnist1d.train_set).double()
    assert abs(inputs.mean().item()) < 1e-6 and inputs.std().item() == pytest.approx(1, abs=1e-6)


@needs_mnist1d
def test_val_size_zero_validates_on_the_test_set_with_a_warning() -> None:
    dm = MNIST1DDataModule(val_size=0)
    with pytest.warns(UserWarning, match="val_size=0 validates on the TEST set"):
        dm.setup("fit")
    assert len(dm.train_set) == 4000 and dm.val_set is dm.test_set


def test_split_and_data_are_deterministic_and_seeded(mnist1d: MNIST1DDataModule) -> None:
    again = MNIST1DDataModule(batch_size=100)
    again.setup("fit")
    for a, b in ((mnist1d.train_set, again.train_set), (mnist1d.val_set, again.val_set)):
        assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors, strict=True))
    other = MNIST1DDataModule(split_seed=1)
    other.setup("fit")
    assert not torch.equal(other.split_indices["val"], mnist1d.split_indices["val"])
    first = next(iter(mnist1d.train_dataloader()))[1]  # the order depends on the seed alone
    assert torch.equal(first, next(iter(again.train_dataloader()))[1])


@needs_mnist1d
def test_generation_is_seeded_and_leaves_the_global_rngs_alone() -> None:
    random.seed(1)
    np.random.seed(1)
    expected = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)
    seven = _generate.__wrapped__(7)  # uncached: mnist1d reseeds both global RNGs inside
    assert (random.random(), np.random.rand()) == expected
    assert seven[0].shape == (4000, 40) and not np.array_equal(seven[0], _generate(42)[0])


@needs_mnist1d
@pytest.mark.parametrize("kwargs,error,match", [
    ({"val_size": 4000}, ValueError, r"val_size must be an int in \[0, 3999\].*got 4000"),
    ({"val_size": -1}, ValueError, r"val_size must be an int in \[0, 3999\].*got -1"),
    ({"val_size": 0.1}, TypeError, r"val_size must be an int .*got 0.1"),
    ({"batch_size": 0}, ValueError, r"batch_size must be an int >= 1, got 0"),
    ({"split_seed": -1}, ValueError, r"split_seed must be an int >= 0, got -1"),
    ({"dataset_seed": "42"}, TypeError, r"dataset_seed must be an int .*got '42' \(str\)"),
    ({"dataset_seed": 2**32}, ValueError, r"dataset_seed must be an int in \[0, 4294967295\]"),
])
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        MNIST1DDataModule(**kwargs)


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r'pip install "lrpet-lightning\[mnist1d\]"'):
        MNIST1DDataModule()


# --- The 1-D ResNet ---------------------------------------------------------------------------

@pytest.mark.parametrize("in_channels,length", [(1, 40), (3, 37)])
def test_resnet1d_output_shape(in_channels: int, length: int) -> None:
    model = build_model("resnet1d", num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        assert model(torch.randn(2, in_channels, length)).shape == (2, 7)
    assert sum(p.numel() for p in resnet1d().parameters()) == 230_570


@pytest.mark.parametrize("kwargs,match", [
    ({"depth": 15}, r"depth must be 6n \+ 2"), ({"depth": 2}, r"depth must be an int >= 8"),
    ({"width": 3}, r"width must be an even int"), ({"width": 0}, r"width must be an int >= 2"),
])
def test_resnet1d_bad_arguments(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resnet1d(**kwargs)


@pytest.mark.parametrize("rank_ratio", sorted(FLOPS_AT))
def test_every_conv_is_bn_rectified_and_decomposition_keeps_the_outputs(
        rank_ratio: float) -> None:
    torch.manual_seed(0)
    model = resnet1d()
    with torch.no_grad():  # non-trivial BN statistics, so rectification matters
        model(torch.randn(64, 1, 40))
    records = project_low_rank_(model, rank_ratio=rank_ratio,
                                example_inputs=torch.randn(2, 1, 40))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv1d)]
    assert [r.name for r in records] == convs and len(convs) == 13
    assert all(r.bn_rectified for r in records)
    projected = copy.deepcopy(model).eval()
    dense = copy.deepcopy(model)
    decompose_(model, ranks={r.name: r.rank for r in records})
    x = torch.randn(8, 1, 40)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), projected(x), rtol=1e-4, atol=1e-4)
    report = compression_report(dense, model, torch.zeros(1, 1, 40))
    assert report.flops_reduction == pytest.approx(FLOPS_AT[rank_ratio], abs=1e-3)


# --- The preset through the app ---------------------------------------------------------------

def test_preset_composes_to_mnist1d_and_resnet1d() -> None:
    cfg = compose("experiment=mnist1d_resnet1d", "output_dir=/tmp/unused")
    assert cfg.data._target_.endswith("MNIST1DDataModule") and cfg.model.arch == "resnet1d"
    assert cfg.callbacks.lrpet.rank_ratio == 0.15 and cfg.callbacks.lrpet.every_n_epochs == 1
    assert cfg.trainer.accelerator == "cpu"


@needs_mnist1d
def test_preset_trains_a_compact_model_in_the_app(tmp_path: Path) -> None:
    from lrpet_lightning.app.train import load_compact_model, train

    results = train(compose("experiment=mnist1d_resnet1d", f"output_dir={tmp_path}", *TINY_RUN,
                            "plot_compression=false"))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["status"] == "finished" and 0.0 <= written["test_acc"] <= 1.0
    assert written["flops_reduction"] == pytest.approx(FLOPS_AT[0.15], abs=1e-3)
    model = load_compact_model(results["compact_model"])
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 40)).shape == (2, 10)
