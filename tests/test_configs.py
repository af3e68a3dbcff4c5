"""The shipped configs say what the code does: the LRPET callback's keys and defaults, the
launch keys (spawn_ranks, trainer.strategy), and the one results.json schema."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from helpers import compose
from omegaconf import DictConfig, OmegaConf

from lrpet_lightning.app import summarize
from lrpet_lightning.app.schema import OPTIONAL_KEYS, REQUIRED_KEYS, RESULT_KEYS
from lrpet_lightning.app.spawn import check_strategy
from lrpet_lightning.app.train import config_dir, train
from lrpet_lightning.callback import LowRankProjectionCallback

#: lrpet.yaml values that differ from LowRankProjectionCallback's defaults on purpose.
APP_OVERRIDES = {
    # The app trains a compressed model out of the box; the callback has no default ratio.
    "rank_ratio": 0.4,
    # lrpet-train ends every run with a compact model, decomposed in the callback's fit end.
    "decompose_on_fit_end": True,
}


def _compose(*overrides: str) -> DictConfig:
    return compose("output_dir=/tmp/unused", *overrides)


def test_every_lrpet_yaml_key_is_a_callback_argument_with_its_default() -> None:
    node = OmegaConf.to_container(OmegaConf.load(config_dir() / "callbacks" / "lrpet.yaml"))
    keys = {k: v for k, v in node["lrpet"].items() if k != "_target_"}
    params = inspect.signature(LowRankProjectionCallback.__init__).parameters
    assert set(keys) <= set(params), sorted(set(keys) - set(params))
    assert set(APP_OVERRIDES) <= set(keys)
    for key, value in keys.items():
        if key in APP_OVERRIDES:
            assert value == APP_OVERRIDES[key], key
            assert value != params[key].default, f"{key} is no override: drop it from the list"
        else:
            assert value == params[key].default, (key, value, params[key].default)


def test_ddp_cpu_spawns_ranks_with_lightnings_ddp_strategy() -> None:
    cfg = _compose("trainer=ddp_cpu")
    assert cfg.spawn_ranks is True and cfg.trainer.strategy == "ddp"
    assert cfg.trainer.devices == 2 and cfg.trainer.accelerator == "cpu"
    assert _compose().spawn_ranks is False
    assert _compose("trainer=ddp_cpu", "spawn_ranks=false").spawn_ranks is False


@pytest.mark.parametrize("override,match", [
    ("+trainer.strategy=ddp_spawn", "trainer.strategy=ddp_spawn runs only fit"),
    ("+trainer.strategy=ddp_fork", "spawn_ranks=true"),
])
def test_multiprocessing_strategies_are_refused_before_training(
        tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train(_compose(override, f"output_dir={tmp_path}"))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("override,match", [
    ("trainer.devices=-1", "trainer.devices must be a number of processes >= 1"),
    ("+trainer.num_nodes=2", "starts processes on this machine only"),
])
def test_spawn_ranks_needs_a_process_count_on_one_machine(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_strategy(_compose("trainer=ddp_cpu", override))


def test_summarize_reads_only_schema_keys() -> None:
    assert set(REQUIRED_KEYS).isdisjoint(OPTIONAL_KEYS)
    assert set(REQUIRED_KEYS) | set(OPTIONAL_KEYS) == set(RESULT_KEYS)
    read = {*summarize._VALUE_COLUMNS, *summarize.ACCURACY_METRICS, "objective", "lrpet"}
    assert read <= set(RESULT_KEYS), sorted(read - set(RESULT_KEYS))


def test_a_run_writes_the_schema_and_one_compression_report(tmp_path: Path) -> None:
    results = train(_compose(
        f"output_dir={tmp_path}", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
        "+trainer.enable_progress_bar=false", "~callbacks.progress_bar",
        "plot_compression=false"))
    assert set(REQUIRED_KEYS) <= set(results) <= set(RESULT_KEYS)
    assert results["status"] == "finished" and results["flops_reduction"] > 0.3
    reports = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("compression_report.json"))
    assert reports == [Path("compression_report.json")]  # none left in csv/
    assert results["report"] == str(tmp_path / "compression_report.json")
