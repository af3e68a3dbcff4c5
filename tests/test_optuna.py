"""``hparams_search=rank_optuna``: two tiny Optuna trials (needs the optuna extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lrpet_lightning.app.summarize import main as summarize_main

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                    reason="the optuna extra (hydra-optuna-sweeper) is not installed")

TINY = ["data=fake", "data.num_samples=16", "data.batch_size=8", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "+trainer.enable_progress_bar=false",
        "~callbacks.progress_bar", "~callbacks.model_checkpoint",
        "~callbacks.resume_checkpoint"]


def test_optuna_searches_the_rank_ratio_on_the_returned_objective(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "optuna"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "lrpet_lightning.app", "-m", "hparams_search=rank_optuna",
         "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2", *TINY,
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    trials = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    for result in trials:
        assert 0.1 <= result["rank_ratio"] <= 0.7  # the searched interval
        # rank_optuna's objective: val_acc, less one point per point short of 60 % fewer FLOPs
        expected = result["val_acc"] - max(0.0, 0.6 - result["flops_reduction"])
        assert result["objective"] == pytest.approx(expected)
    assert trials[0]["rank_ratio"] != trials[1]["rank_ratio"]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    winner = max(trials, key=lambda r: r["objective"])
    assert best.best_value == pytest.approx(winner["objective"])
    assert best.best_params["callbacks.lrpet.rank_ratio"] == pytest.approx(winner["rank_ratio"])

    summarize_main([str(sweep)])  # an Optuna sweep folder summarizes like any multirun
    assert "objective" in capsys.readouterr().out
    assert (sweep / "pareto.png").stat().st_size > 0
