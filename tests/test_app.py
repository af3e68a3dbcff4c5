"""The Hydra app: every config composes, train(cfg) runs, a run's compact model reloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, compose
from omegaconf import DictConfig

from lrpet_lightning.app.train import config_dir, load_compact_model, train

CONF = config_dir()
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


_compose = compose


def _tiny(tmp_path: Path, *overrides: str) -> DictConfig:
    """A config that trains for seconds: a few batches, no progress bar."""
    return compose(f"output_dir={tmp_path}", *TINY_RUN, *overrides)


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_config_composes(group: str, option: str) -> None:
    if group == "hparams_search":  # these load the sweeper plugin's config
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                            reason="the optuna extra (hydra-optuna-sweeper) is not installed")
    cfg = _compose(f"{group}={option}", "output_dir=/tmp/unused")
    assert cfg.data is not None and cfg.trainer is not None


def test_default_composition_is_digits_resnet20_with_lrpet() -> None:
    cfg = _compose("output_dir=/tmp/unused")
    assert cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.model.arch == "resnet20"
    assert set(cfg.callbacks) == {"model_checkpoint", "resume_checkpoint", "lr_monitor",
                                  "progress_bar", "lrpet"}
    assert cfg.callbacks.lrpet._target_ == "lrpet_lightning.LowRankProjectionCallback"


@pytest.mark.parametrize("model", ["resnet20", "resnet32",
                                   pytest.param("vgg16_bn", marks=pytest.mark.slow)])
def test_train_runs_each_cifar_model_on_fake_data(tmp_path: Path, model: str) -> None:
    cfg = _tiny(tmp_path, f"model={model}", "data=fake", "data.num_samples=16",
                "data.batch_size=8")
    results = train(cfg)
    assert 0.0 <= results["test_acc"] <= 1.0
    assert results["flops_reduction"] > 0.3


@pytest.mark.parametrize("arch", [pytest.param("tv_resnet18", marks=pytest.mark.slow),
                                  "tv_mobilenet_v2"])
def test_train_runs_torchvision_models(tmp_path: Path, arch: str) -> None:
    small = "true" if arch == "tv_resnet18" else "false"
    cfg = _tiny(tmp_path, "model=torchvision", f"model.arch={arch}", f"model.small_input={small}",
                "data=fake", "data.num_samples=8", "data.batch_size=4")
    results = train(cfg)
    assert results["flops_reduction"] > 0.0


def test_flops_budget_run_meets_and_records_its_target(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path, "callbacks.lrpet.rank_ratio=null",
                "callbacks.lrpet.target_flops_reduction=0.6")
    results = train(cfg)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["target_flops_reduction"] == 0.6
    assert written["allocation"] == "uniform"
    assert written["rank_ratio"] is None
    # The budget solver lands within one point above the target on the decomposed model.
    assert 0.6 <= results["flops_reduction"] <= 0.61


def test_digits_run_writes_results_and_a_compact_model_that_reloads(
        tmp_path: Path, cfg_tiny: DictConfig) -> None:
    cfg = cfg_tiny
    results = train(cfg)
    written = json.loads((tmp_path / "results.json").read_text())
    for key in ("test_acc", "val_acc", "flops_reduction", "params_reduction", "rank_ratio",
                "compact_model", "report"):
        assert key in written, key
    assert written["rank_ratio"] == 0.4
    assert (tmp_path / "compression_report.md").read_text().startswith("| layer")
    assert (tmp_path / "csv" / "metrics.csv").is_file()

    # The reloaded compact model predicts exactly what the run tested, on the datamodule
    # its metadata records (16x16 digits, not DigitsDataModule's 32x32 default).
    model = load_compact_model(results["compact_model"])
    import hydra

    from lrpet_lightning.core.checkpoint import read_compact

    meta = read_compact(results["compact_model"])["metadata"]
    assert meta["input_spec"]["image_size"] == cfg.data.image_size == 16
    assert meta["input_spec"]["in_channels"] == 1 and meta["input_spec"]["num_classes"] == 10
    assert isinstance(meta["input_spec"]["mean"], float)
    dm = hydra.utils.instantiate(meta["data"])
    dm.setup("test")
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
            if total >= 2 * cfg.data.batch_size:  # limit_test_batches=2
                break
    assert correct / total == pytest.approx(results["test_acc"], abs=1e-6)


def test_unknown_model_or_data_lists_the_options() -> None:
    with pytest.raises(Exception, match="resnet20"):
        _compose("model=resnet99", "output_dir=/tmp/unused")
    with pytest.raises(Exception, match="digits"):
        _compose("data=mnist", "output_dir=/tmp/unused")


def test_missing_imagenet_path_is_explained(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path, "data=imagenet", f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="train"):
        train(cfg)


@pytest.mark.slow
def test_wheel_install_finds_its_configs_from_another_directory(tmp_path: Path) -> None:
    """A plain (non-editable) install ships conf/ inside the package."""
    repo = Path(__file__).resolve().parent.parent
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(repo)],
        check=True, capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c",
         "import lrpet_lightning.app.train as t; print(t.config_dir())"],
        cwd=elsewhere, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert out.startswith(str(target)), out
    run = subprocess.run(
        [sys.executable, "-m", "lrpet_lightning.app", "--cfg", "job"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "DigitsDataModule" in run.stdout


@pytest.mark.parametrize("logger,package", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"),
                                            ("wandb", "wandb")])
def test_optional_loggers_explain_a_missing_package(tmp_path: Path, logger: str,
                                                     package: str) -> None:
    import importlib.util

    from lrpet_lightning.app.build import instantiate_logger

    cfg = _compose(f"logger={logger}", f"output_dir={tmp_path}")
    if importlib.util.find_spec(package) is not None:
        assert instantiate_logger(cfg) is not None
    else:
        with pytest.raises(RuntimeError, match="install it, or use logger=csv"):
            instantiate_logger(cfg)


@pytest.mark.parametrize(
    "override,match",
    [
        ("callbacks.lrpet.rank_ratio=1.5", "rank_ratio must be a number in"),
        ("callbacks.lrpet.rank_ratio=abc", "rank_ratio must be a number in"),
        ("callbacks.lrpet.residual_scale=2", "residual_scale must be a number in"),
        ("callbacks.lrpet.every_n_epochs=0", "every_n_epochs must be an int >= 1"),
        ("callbacks.lrpet.svd_method=qr", "svd_method must be one of"),
        ("callbacks.lrpet.include=[nothing.*]", "include pattern 'nothing.\\*' matches no"),
        ("callbacks.lrpet.ranks={layer9.conv: 4}", "ranks pattern 'layer9.conv' matches no"),
        ("model.arch=resnet99", "available models"),
        ("data.batch_size=0", "batch_size"),
        ("optim.lr=abc", "optim.lr must be a number > 0, got 'abc'"),
        ("optim.nesterov=maybe", "optim.nesterov must be True or False, got 'maybe'"),
        ("optim.milestones=[a]", "optim.milestones must be a list of int epochs"),
        ("+optim.lrr=0.1", "optim.lrr is not an optimizer setting; allowed: optim.lr, "),
        ("compact_model_name=1", "compact_model_name must be a plain file name ending in .pt"),
    ],
)
def test_bad_overrides_fail_before_training_with_a_clear_message(
    tmp_path: Path, override: str, match: str
) -> None:
    cfg = _tiny(tmp_path, override)
    with pytest.raises(Exception, match=match):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()  # no training step ran


def test_step_schedule_override_alone_is_enough(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path, "callbacks.lrpet.every_n_train_steps=2")
    results = train(cfg)
    assert results["flops_reduction"] > 0.5
