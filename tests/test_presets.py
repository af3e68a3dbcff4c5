"""The paper presets (conf/experiment/): they compose, build their model and, decomposed as the
callback decomposes them, shed the FLOPs the reference code reports for the same setting.

No training. Each model is built on the ``meta`` device: layer selection, ranks, the thin
layers and ``torch.utils.flop_counter`` need only shapes, so even ResNet-50 at 224x224 takes
a fraction of a second. (A smaller ImageNet input would not do: the final Linear's FLOPs do not
shrink with the image, so the reduction moves — ResNet-50 at rank_ratio 0.38: 53.47 % at 224,
53.41 % at 112, 53.17 % at 64.) One test checks that real weights give the same count.

Where the figures come from — the paper's own tables could not be retrieved here (only the
abstract pages of arXiv 2204.05566 were reachable), so every figure is the one the authors'
public reference code prints or states for the same setting:

- CIFAR ResNet-56 / ResNet-110: the reference ``cifar10_train.py``
  comments (``prun_goal`` 0.80 -> 79.1 %, 0.54 -> 51.0 %; ResNet-110 0.62 -> 58.2 %,
  0.70 -> 69.3 %).
- ImageNet ResNet-34 / ResNet-50: the reference ``imagenet_resnet_trans_train.py`` comments
  (ResNet-34 ``--prun_goal 0.58`` -> 53.2 %; ResNet-50 0.62 -> 53.5 %, 0.80 -> 75.8 %), with
  torchvision's models as there.
- CIFAR VGG-16-BN: the earlier reference ``cifar10_train_bn.py`` (per-layer rank lists ->
  61.0 %, 66.2 %, 79.2 %); the preset uses the 66.2 % list.
- The presets named after a row of the reference code's README results table (TNNLS-era
  version; ``README_ROWS``): ResNet-56 prun_goal 0.57 -> 55.3 %, ResNet-110 0.65 -> 62.9 %,
  VGG-16-BN ranks 18 / 43 -> 74.0 %, CIFAR GoogLeNet 0.60 -> 51.4 %, ImageNet ResNet-18 0.58
  -> 52.5 %, ResNet-34 0.58 -> 53.2 %, ResNet-50 0.62 -> 53.5 %. Every row reproduces with
  every conv decomposed and the Linear left dense, as the app does.

The ImageNet presets state the paper's global batch (``data.global_batch_size: 256``); the
app derives the batch per process from the world size (``test_global_batch_*``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from helpers import compose
from omegaconf import DictConfig
from torch import nn

from lrpet_lightning import CompressionReport, compression_report, decompose_
from lrpet_lightning.app.build import data_config, world_size
from lrpet_lightning.app.module import ImageClassifier
from lrpet_lightning.app.train import config_dir, train
from lrpet_lightning.core.walk import select_layers
from lrpet_lightning.models import build_model

CONF = config_dir()
TOLERANCE = 0.5  # percentage points

#: preset -> FLOPs reduction (%) the reference code reports for the same setting.
REFERENCE = {
    "cifar10_resnet56": 79.1,
    "cifar10_resnet110": 58.2,
    "cifar10_vgg16": 66.2,
    "imagenet_resnet34": 53.2,
    "imagenet_resnet50": 53.5,
    # The rows of the reference code's README results table (the two ImageNet rows above too).
    "cifar10_resnet56_pg57": 55.3,
    "cifar10_resnet110_pg65": 62.9,
    "cifar10_vgg16_r43": 74.0,
    "cifar10_googlenet": 51.4,
    "imagenet_resnet18": 52.5,
}
#: The presets that are a row of the reference code's README: trained on all 50,000 images.
README_ROWS = ["cifar10_resnet56_pg57", "cifar10_resnet110_pg65", "cifar10_vgg16_r43",
               "cifar10_googlenet", "imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50"]
#: The other settings the presets' comments name: (preset, overrides, reference %).
ALTERNATIVES = [
    ("cifar10_resnet56", ["callbacks.lrpet.rank_ratio=0.46"], 51.0),
    ("cifar10_resnet110", ["callbacks.lrpet.rank_ratio=0.30"], 69.3),
    ("imagenet_resnet50", ["callbacks.lrpet.rank_ratio=0.20"], 75.8),
]
VGG_CONVS = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
#: The reference code's VGG-16-BN rank lists and the FLOPs reduction (%) it states for each.
VGG_REFERENCE_LISTS = [
    ([14, 36, 70, 70, 80, 80, 80] + [105] * 6, 61.0),
    ([18, 42, 60, 60, 65, 65, 65] + [70] * 6, 66.2),
    ([18, 42] + [30] * 11, 79.2),
]


def _compose(preset: str, *overrides: str) -> DictConfig:
    return compose(f"experiment={preset}", "output_dir=/tmp/unused", "data.root=/tmp/no-data",
                   *overrides)


def _decompose_as_the_app(cfg: DictConfig, device: str = "meta") -> tuple[CompressionReport,
                                                                            dict[str, int]]:
    """Build the preset's network and LightningModule as ``train(cfg)`` does, plan the layers
    as the callback does at fit start, decompose as it does at fit end, and count."""
    datamodule = hydra.utils.instantiate(data_config(cfg))  # no file is read before setup()
    with torch.device(device):
        net = build_model(cfg.model.arch, num_classes=datamodule.num_classes,
                          in_channels=datamodule.in_channels, small_input=cfg.model.small_input)
    module = ImageClassifier(net, datamodule.num_classes, max_epochs=cfg.trainer.max_epochs,
                             **dict(cfg.optim))
    callback = hydra.utils.instantiate(cfg.callbacks.lrpet)
    assert getattr(callback.config, "budget", None) is None  # presets give ranks, not budgets
    ranks = {layer.name: layer.rank for layer in select_layers(module, callback.config)}
    dense = copy.deepcopy(net)
    decomposed = decompose_(module, ranks=ranks, include_linear=callback.config.include_linear)
    assert decomposed == ranks, "a planned layer was left dense"
    x = torch.zeros(datamodule.example_input_shape, device=device)
    return compression_report(dense, module.model, x), ranks


@pytest.mark.parametrize("preset", sorted(REFERENCE))
def test_preset_gives_the_reference_flops_reduction(preset: str) -> None:
    report, _ = _decompose_as_the_app(_compose(preset))
    assert 100 * report.flops_reduction == pytest.approx(REFERENCE[preset], abs=TOLERANCE)


@pytest.mark.parametrize("preset,overrides,reference", ALTERNATIVES)
def test_alternative_settings_named_in_the_presets(preset: str, overrides: list[str],
                                                   reference: float) -> None:
    report, _ = _decompose_as_the_app(_compose(preset, *overrides))
    assert 100 * report.flops_reduction == pytest.approx(reference, abs=TOLERANCE)


@pytest.mark.parametrize("ranks,reference", VGG_REFERENCE_LISTS)
def test_vgg16_reference_rank_lists(ranks: list[int], reference: float) -> None:
    """Our VGG-16-BN (13 convs, one Linear) and counter agree with all three reference lists,
    so the preset's model is the reference's (a 3-Linear classifier would count 57-75 %)."""
    with torch.device("meta"):
        net = build_model("vgg16_bn")
        dense = copy.deepcopy(net)
        decompose_(net, ranks={f"features.{i}": r for i, r in zip(VGG_CONVS, ranks, strict=True)})
        report = compression_report(dense, net, torch.zeros(1, 3, 32, 32))
    assert 100 * report.flops_reduction == pytest.approx(reference, abs=TOLERANCE)


def test_vgg16_preset_plans_the_reference_ranks() -> None:
    _, ranks = _decompose_as_the_app(_compose("cifar10_vgg16"))
    expected = VGG_REFERENCE_LISTS[1][0]
    assert ranks == {f"model.features.{i}": r for i, r in zip(VGG_CONVS, expected, strict=True)}


def test_vgg16_readme_preset_plans_18_then_43() -> None:
    _, ranks = _decompose_as_the_app(_compose("cifar10_vgg16_r43"))
    assert ranks == {f"model.features.{i}": 18 if i == 0 else 43 for i in VGG_CONVS}


def test_googlenet_readme_row_counts_every_conv_and_not_the_linear() -> None:
    """The 51.4 % row: all 64 convs of the CIFAR GoogLeNet at 40 % of their rank (the pre-layer
    included), the classifier dense. With the Linear decomposed too it would not be 51.4 %."""
    cfg = _compose("cifar10_googlenet")
    report, ranks = _decompose_as_the_app(cfg)
    assert len(ranks) == 64 and "model.pre_layers.0" in ranks and "model.linear" not in ranks
    with_linear, _ = _decompose_as_the_app(_compose("cifar10_googlenet",
                                                    "callbacks.lrpet.include_linear=true"))
    assert with_linear.flops_reduction > report.flops_reduction


def test_vgg16_preset_trains_in_the_app(tmp_path: Path) -> None:
    """Its per-layer names must match what the callback sees in the app (``model.``…): a
    pattern that matches nothing stops the fit. Fake data, CPU, two batches."""
    cfg = compose(
        "experiment=cifar10_vgg16", "data=fake", "data.num_samples=16", "data.batch_size=8",
        "trainer=cpu", f"output_dir={tmp_path}", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "+trainer.enable_progress_bar=false",
        "~callbacks.progress_bar")
    results = train(cfg)
    assert 100 * results["flops_reduction"] == pytest.approx(REFERENCE["cifar10_vgg16"],
                                                             abs=TOLERANCE)


def test_meta_count_equals_the_count_with_real_weights() -> None:
    meta, meta_ranks = _decompose_as_the_app(_compose("cifar10_resnet56"))
    real, real_ranks = _decompose_as_the_app(_compose("cifar10_resnet56"), device="cpu")
    assert meta_ranks == real_ranks
    assert (meta.dense_flops, meta.compact_flops) == (real.dense_flops, real.compact_flops)
    assert (meta.dense_params, meta.compact_params) == (real.dense_params, real.compact_params)


@pytest.mark.parametrize("preset", sorted(REFERENCE))
def test_preset_follows_the_paper_recipe(preset: str) -> None:
    """The paper's CIFAR and ImageNet schedules."""
    cfg = _compose(preset)
    lrpet: Any = cfg.callbacks.lrpet
    assert cfg.optim.lr == 0.1 and cfg.optim.momentum == 0.9
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.scheduler == "multistep"
    if preset.startswith("cifar10"):
        assert cfg.data._target_.endswith("CIFARDataModule") and cfg.data.batch_size == 128
        assert cfg.trainer.max_epochs == 400 and list(cfg.optim.milestones) == [200, 300]
        assert lrpet.every_n_epochs == 1 and lrpet.every_n_train_steps is None
        assert cfg.trainer.precision == "32-true"  # fp32, as the reference code
        # Every preset holds 5,000 training images out for validation (our honest protocol;
        # data.val_size=0 is the reference's, validating on the test set).
        assert cfg.data.val_size == 5000
    else:
        assert cfg.data._target_.endswith("ImageNetDataModule")
        assert cfg.data.global_batch_size == 256 and cfg.data.batch_size is None
        assert cfg.trainer.max_epochs == 120 and list(cfg.optim.milestones) == [30, 60, 90]
        assert lrpet.every_n_epochs is None and lrpet.every_n_train_steps == 250
        assert cfg.model.arch.startswith("tv_resnet")


def test_presets_build_real_models() -> None:
    """Every preset's model builds with real weights and runs one forward pass."""
    for preset in REFERENCE:
        cfg = _compose(preset)
        datamodule = hydra.utils.instantiate(data_config(cfg))
        net: nn.Module = build_model(cfg.model.arch, num_classes=datamodule.num_classes,
                                     in_channels=datamodule.in_channels,
                                     small_input=cfg.model.small_input).eval()
        size = 64 if preset.startswith("imagenet") else datamodule.image_size
        with torch.no_grad():
            out = net(torch.zeros(1, datamodule.in_channels, size, size))
        assert out.shape == (1, datamodule.num_classes)


# --- The ImageNet presets' global batch -------------------------------------------------------

@pytest.mark.parametrize("trainer,overrides,per_process", [
    ("gpu", [], 256),                                                  # one GPU
    ("ddp", ["trainer.devices=8"], 32),                                # one node of 8
    ("ddp_multinode", ["trainer.devices=8", "trainer.num_nodes=2"], 16),
    ("ddp_multinode", ["trainer.devices=4", "trainer.num_nodes=8"], 8),
    ("ddp", ["trainer.devices=[0,1,2,3]"], 64),                        # device ids
    ("ddp", ["trainer.devices='0,1'"], 128),
])
@pytest.mark.parametrize("preset", ["imagenet_resnet18", "imagenet_resnet34",
                                    "imagenet_resnet50"])
def test_global_batch_is_the_papers_on_any_world_size(preset: str, trainer: str,
                                                      overrides: list[str],
                                                      per_process: int) -> None:
    cfg = _compose(preset, f"trainer={trainer}", *overrides)
    data = data_config(cfg)
    assert data.batch_size == per_process and "global_batch_size" not in data
    assert data.batch_size * world_size(cfg.trainer) == 256
    assert cfg.data.batch_size is None and cfg.data.global_batch_size == 256  # cfg untouched
    assert hydra.utils.instantiate(data).batch_size == per_process


def test_every_gpu_is_resolved_as_lightning_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer=ddp's ``devices: -1`` (and "auto") on a GPU: every visible GPU."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for devices in ("-1", "auto"):
        cfg = _compose("imagenet_resnet50", "trainer=ddp_multinode",
                       f"trainer.devices={devices}", "trainer.num_nodes=2")
        assert world_size(cfg.trainer) == 16 and data_config(cfg).batch_size == 16
    assert world_size({"accelerator": "auto", "devices": "auto"}) == 8


def test_world_size_on_cpu() -> None:
    assert world_size({"accelerator": "cpu", "devices": "auto"}) == 1
    assert world_size({"accelerator": "cpu", "devices": 2, "num_nodes": 3}) == 6
    with pytest.raises(ValueError, match=r"trainer.devices=-1 means every GPU"):
        world_size({"accelerator": "cpu", "devices": -1})
    with pytest.raises(ValueError, match=r"trainer.devices must be"):
        world_size({"accelerator": "cpu", "devices": 0})
    with pytest.raises(TypeError, match=r"trainer.num_nodes must be"):
        world_size({"accelerator": "cpu", "devices": 1, "num_nodes": "2x"})


def test_global_batch_that_does_not_divide_is_refused() -> None:
    cfg = _compose("imagenet_resnet50", "trainer=ddp_multinode", "trainer.devices=3",
                   "trainer.num_nodes=2")
    with pytest.raises(ValueError, match=r"data.global_batch_size=256 does not divide over "
                                         r"trainer.devices=3 x trainer.num_nodes=2 = 6 proc"):
        data_config(cfg)
    with pytest.raises(TypeError, match=r"data.global_batch_size must be"):
        data_config(_compose("imagenet_resnet50", "data.global_batch_size=2.5"))
    with pytest.raises(ValueError, match=r"data.global_batch_size must be"):
        data_config(_compose("imagenet_resnet50", "data.global_batch_size=0"))


def test_batch_per_process_stays_per_process() -> None:
    """Without a global batch, ``data.batch_size`` means per process, as before; with the
    presets' global batch, a per-process batch as well is refused rather than ignored."""
    plain = _compose("imagenet_resnet50", "data.global_batch_size=null", "data.batch_size=48",
                     "trainer=ddp_multinode")
    assert data_config(plain).batch_size == 48
    bare = compose("data=imagenet", "data.root=/tmp/no-data", "data.batch_size=64",
                   "trainer.devices=8", "output_dir=/tmp/unused")
    assert bare.data.global_batch_size is None and data_config(bare).batch_size == 64
    assert data_config(_compose("cifar10_resnet56", "trainer.devices=4")).batch_size == 128
    with pytest.raises(ValueError, match=r"data.batch_size=32 \(per process\) and "
                                         r"data.global_batch_size=256 .* are both set"):
        data_config(_compose("imagenet_resnet50", "data.batch_size=32"))


def test_app_refuses_a_global_batch_before_training(tmp_path: Path) -> None:
    """train() stops before it claims the run dir or builds anything."""
    cfg = compose("experiment=imagenet_resnet18", "data.root=/tmp/no-data", "trainer=cpu",
                  "trainer.devices=3", f"output_dir={tmp_path / 'run'}")
    with pytest.raises(ValueError, match=r"does not divide over trainer.devices=3"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    # The same when the app starts the ranks itself: refused before any process is spawned.
    spawned = compose("experiment=imagenet_resnet18", "data.root=/tmp/no-data",
                      "trainer=ddp_cpu", "trainer.devices=3", f"output_dir={tmp_path / 'run'}")
    assert spawned.spawn_ranks
    with pytest.raises(ValueError, match=r"does not divide over trainer.devices=3"):
        train(spawned)
    assert not (tmp_path / "run").exists()


def test_trainer_with_another_world_size_is_refused() -> None:
    from lightning.pytorch import Trainer

    from lrpet_lightning.app.build import check_world_size

    cfg = _compose("imagenet_resnet50", "trainer=cpu", "trainer.devices=2")
    assert data_config(cfg).batch_size == 128
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"divided over trainer.devices=2 x trainer.num_nodes=1"
                                         r" = 2 processes, but the trainer runs 1"):
        check_world_size(cfg, trainer)
    check_world_size(_compose("imagenet_resnet50", "trainer=cpu"), trainer)  # 1 = 1


def test_app_builds_the_derived_batch(tmp_path: Path) -> None:
    """Through build(): the datamodule the trainer gets has the derived batch."""
    from lrpet_lightning.app.build import build

    cfg = compose("data=fake", "+data.global_batch_size=64", "data.batch_size=null",
                  "trainer=cpu", "trainer.max_epochs=1", f"output_dir={tmp_path}")
    run = build(cfg)
    assert run.datamodule.batch_size == 64 and run.trainer.world_size == 1
