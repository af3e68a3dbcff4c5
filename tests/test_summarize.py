"""Sweeps: a Hydra multirun over rank ratios, then ``lrpet-summarize`` on its folder."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import compose

from lrpet_lightning.app import summarize as summarize_module
from lrpet_lightning.app.summarize import load_runs, main, pareto_front, summarize
from lrpet_lightning.app.train import _task, train

#: The fastest settings that still train, project, decompose and test (see test_app.py).
TINY = ["data=fake", "data.num_samples=16", "data.batch_size=8", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "+trainer.enable_progress_bar=false",
        "~callbacks.progress_bar", "~callbacks.model_checkpoint",
        "~callbacks.resume_checkpoint"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


_compose = compose


def _lrpet_train(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``lrpet-train ARGS`` in a fresh interpreter (Hydra owns its process), one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    run = subprocess.run([sys.executable, "-m", "lrpet_lightning.app", *args], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000, path


@pytest.mark.slow  # two lrpet-train runs in fresh interpreters: ~10 s
def test_multirun_over_rank_ratios_then_summarize(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    _lrpet_train("-m", "callbacks.lrpet.rank_ratio=0.1,0.2", *TINY,
                 f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [r["rank_ratio"] for r in results] == [0.1, 0.2]
    assert [r["output_dir"] for r in results] == [str(sweep / "0"), str(sweep / "1")]
    assert results[0]["flops_reduction"] > results[1]["flops_reduction"] > 0.5
    for i in (0, 1):  # every run pictures its compression
        _assert_png(sweep / str(i) / "compression_report.png")
        log_text = (sweep / str(i) / "train.log").read_text()  # Hydra's file: real lines
        assert f"training resnet20 on FakeDataModule for 1 epoch(s); outputs in " \
               f"{sweep / str(i)}" in log_text
        assert f"results in {sweep / str(i) / 'results.json'}" in log_text

    main([str(sweep)])
    printed = capsys.readouterr().out
    assert "| run | callbacks.lrpet.rank_ratio |" in printed
    assert "| 0 | 0.1 | yes | 0.1 |" in printed and "| 1 | 0.2 | yes | 0.2 |" in printed
    rows = _read_csv(sweep / "summary.csv")
    assert [row["run"] for row in rows] == ["0", "1"]
    assert [row["callbacks.lrpet.rank_ratio"] for row in rows] == ["0.1", "0.2"]
    # The table holds exactly what the runs wrote.
    for row, result in zip(rows, results, strict=True):
        for key in ("rank_ratio", "flops_reduction", "params_reduction", "val_acc",
                    "test_acc", "wall_time_s"):
            assert float(row[key]) == pytest.approx(result[key], rel=1e-12), key
    # Two ratios trade FLOPs for accuracy: the front holds every run no other one beats.
    expected = pareto_front([(r["flops_reduction"], r["test_acc"]) for r in results])
    assert [row["pareto"] == "True" for row in rows] == expected
    md = (sweep / "summary.md").read_text()
    assert md.count("\n| 0 |") == 1 and md.count("\n| 1 |") == 1
    _assert_png(sweep / "pareto.png")


def test_a_dense_run_is_the_baseline_line(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = tmp_path / "sweep"
    # A dense run (callback off) and a compressed one, in-process; the dense run also
    # returns a FLOPs-penalized objective, as a sweeper would receive it.
    objective = _task(_compose(*TINY, f"output_dir={sweep / 'dense'}", "callbacks.lrpet=null",
                               "objective.metric=val_acc", "objective.min_flops_reduction=0.5",
                               "objective.flops_penalty=2"))
    dense = json.loads((sweep / "dense" / "results.json").read_text())
    assert dense["lrpet"] is False and dense["flops_reduction"] == 0.0
    assert objective == pytest.approx(dense["val_acc"] - 2 * 0.5)
    assert dense["objective"] == objective
    train(_compose(*TINY, f"output_dir={sweep / 'r02'}", "callbacks.lrpet.rank_ratio=0.2"))
    compressed = json.loads((sweep / "r02" / "results.json").read_text())

    drawn: dict[str, Any] = {}

    def record(points: Any, path: Path, **kwargs: Any) -> Path:
        drawn.update(points=points, **kwargs)
        Path(path).write_bytes(PNG_MAGIC)
        return Path(path)

    monkeypatch.setattr("lrpet_lightning.plots.plot_pareto", record)
    table = summarize(sweep, metric="val_acc")
    assert drawn["baselines"] == [{"label": "run dense", "accuracy": dense["val_acc"]}]
    assert [p["flops_reduction"] for p in drawn["points"]] == [compressed["flops_reduction"]]
    assert drawn["points"][0]["pareto"] is True
    rows = {row["run"]: row for row in _read_csv(sweep / "summary.csv")}
    assert rows["dense"]["lrpet"] == "False" and rows["dense"]["pareto"] == "False"
    assert float(rows["dense"]["objective"]) == pytest.approx(objective)
    assert rows["r02"]["objective"] == ""  # no objective asked for in that run
    assert "| dense |" in table and "| r02 |" in table


def test_pareto_front_keeps_the_points_nothing_beats() -> None:
    points = [(0.5, 0.90), (0.6, 0.85), (0.55, 0.80), (0.7, 0.85), (0.7, 0.85), (0.8, 0.60)]
    # (0.6, .85) loses to (0.7, .85); (0.55, .80) to (0.6, .85); equal points both stay.
    assert pareto_front(points) == [True, False, False, True, True, True]
    assert pareto_front([]) == []


def _fake_run(run_dir: Path, overrides: list[str], **results: Any) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {o}\n" for o in overrides))
    if results:
        (run_dir / "results.json").write_text(json.dumps(results))


def test_runs_are_ordered_by_job_number_and_overrides_parsed(tmp_path: Path) -> None:
    for i in (10, 2, 1):
        _fake_run(tmp_path / str(i), [f"callbacks.lrpet.rank_ratio=0.{i}", "seed=0"],
                  lrpet=True, rank_ratio=i / 100, flops_reduction=0.5, val_acc=0.5)
    _fake_run(tmp_path / "3", ["callbacks.lrpet.rank_ratio=0.3", "seed=0"])  # it failed
    runs = load_runs(tmp_path)
    assert [r.name for r in runs] == ["1", "2", "10"]
    assert runs[0].overrides == {"callbacks.lrpet.rank_ratio": "0.1", "seed": "0"}
    table = summarize(tmp_path)  # val_acc: no run has a test_acc
    assert "1 run(s) without results.json (unfinished or failed), left out: 3" in table
    header = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert header.startswith("run,callbacks.lrpet.rank_ratio,lrpet,")  # seed=0 is not swept
    assert len((tmp_path / "summary.csv").read_text().splitlines()) == 4


def test_summarize_explains_a_folder_without_runs(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "MULTIRUN_DIR" in capsys.readouterr().err
    _fake_run(tmp_path / "0", ["callbacks.lrpet.rank_ratio=0.1"])  # started, never finished
    with pytest.raises(FileNotFoundError,
                       match=r"no runs in .*no results.json.*1 run\(s\) started but wrote none"):
        load_runs(tmp_path)
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no runs in" in capsys.readouterr().err


def test_summarize_rejects_bad_input(tmp_path: Path) -> None:
    _fake_run(tmp_path / "0", [], lrpet=True, flops_reduction=0.5, val_acc=0.5)
    with pytest.raises(ValueError, match="metric must be one of test_acc, val_acc, got 'acc'"):
        summarize(tmp_path, metric="acc")
    (tmp_path / "0" / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a list, expected a JSON object"):
        load_runs(tmp_path)
    (tmp_path / "0" / "results.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_runs(tmp_path)


@pytest.mark.parametrize(
    "override,match",
    [
        ("objective.metric=accuracy", "objective.metric must be one of val_acc, test_acc"),
        ("objective.min_flops_reduction=1.5", "objective.min_flops_reduction must be a number "
                                              "in \\[0, 1\\), got 1.5"),
        ("objective.flops_penalty=-1", "objective.flops_penalty must be a number >= 0"),
        ("spectra_layers=[layer9.conv1]", "spectra_layers names 'layer9.conv1', which is not"),
    ],
)
def test_bad_objective_or_spectra_fail_before_training(tmp_path: Path, override: str,
                                                       match: str) -> None:
    extra = [] if override.startswith("spectra") else ["objective.metric=val_acc"]
    cfg = _compose(*TINY, f"output_dir={tmp_path}", *extra, override)
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not (tmp_path / "results.json").exists()


def test_test_metric_objective_needs_the_test_split(tmp_path: Path) -> None:
    cfg = _compose(*TINY, f"output_dir={tmp_path}", "objective.metric=test_acc", "test=false")
    with pytest.raises(ValueError, match="objective.metric=test_acc needs the test split"):
        train(cfg)


def test_lrpet_summarize_is_a_console_script() -> None:
    # pyproject.toml, not the installed metadata: a stale *.egg-info in the checkout would
    # shadow the installed entry points.
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    line = next(x for x in pyproject.splitlines() if x.startswith("lrpet-summarize = "))
    module, _, function = line.split(" = ")[1].strip('"').partition(":")
    assert getattr(__import__(module, fromlist=[function]), function) is summarize_module.main


def test_non_finite_values_are_missing_and_named(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN FLOPs reduction is no point on the front; a NaN test accuracy does not drop the
    best run; a compressed run with no measured reduction is not plotted as uncompressed."""
    _fake_run(tmp_path / "0", ["seed=0"], lrpet=True, flops_reduction=0.5, val_acc=0.9,
              test_acc=0.9)
    _fake_run(tmp_path / "1", ["seed=1"], lrpet=True, flops_reduction=float("nan"),
              val_acc=0.95, test_acc=0.95)
    _fake_run(tmp_path / "2", ["seed=2"], lrpet=True, flops_reduction=0.6, val_acc=0.97,
              test_acc=float("inf"))
    _fake_run(tmp_path / "3", ["seed=3"], lrpet=True, flops_reduction=None, val_acc=0.99,
              test_acc=0.99, status="already_finished")
    drawn: dict[str, Any] = {}

    def record(points: Any, path: Path, **kwargs: Any) -> Path:
        drawn["points"] = points
        Path(path).write_bytes(PNG_MAGIC)
        return Path(path)

    monkeypatch.setattr("lrpet_lightning.plots.plot_pareto", record)
    table = summarize(tmp_path)
    # test_acc is missing in run 2, so the front is on val_acc, where run 2 is the best.
    assert "Pareto front on val top-1" in (tmp_path / "summary.md").read_text()
    assert [(p["flops_reduction"], p["accuracy"], p["pareto"]) for p in drawn["points"]] == \
        [(0.5, 0.9, False), (0.6, 0.97, True)]
    assert "2 run(s) with NaN/inf values, read as missing: 1 (flops_reduction), " \
           "2 (test_acc)" in table
    assert "left off the plot and the Pareto front: 1, 3" in table
    rows = {row["run"]: row for row in _read_csv(tmp_path / "summary.csv")}
    assert rows["1"]["flops_reduction"] == "" and rows["2"]["test_acc"] == ""
