"""The lifecycle of an ``lrpet-train`` run through ``train(cfg)`` and the *shipped* configs:
resume checkpoints, relaunching a finished run, a second run into a used dir, divergence,
faults after training, and what each leaves in ``results.json``."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import compose
from omegaconf import DictConfig

import lrpet_lightning.app.train as app
from lrpet_lightning.app.module import ImageClassifier
from lrpet_lightning.app.train import train

BATCHES = 3  # training batches per epoch
HERE = Path(__file__).resolve().parent  # lifecycle_callbacks.py, for lrpet-train


def _cfg(out: Path, *overrides: str) -> DictConfig:
    """The shipped default config (checkpoints included), trimmed to seconds."""
    return compose(
        f"output_dir={out}", "trainer.max_epochs=1", f"+trainer.limit_train_batches={BATCHES}",
        "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
        "+trainer.enable_progress_bar=false", "~callbacks.progress_bar",
        "plot_compression=false", *overrides)


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _lrpet_state(ckpt: dict) -> dict:
    """The LRPET callback's state in a Lightning checkpoint."""
    (state,) = (v for k, v in ckpt["callbacks"].items() if k.startswith("LowRankProjection"))
    return state


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file a run left in ``run_dir`` (Hydra's log aside), byte for byte."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != "train.log"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The results of one untroubled default run (the shipped configs, 1 epoch), which a
    troubled run must match: run once per module, as every scenario compares with it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test runs (conftest): the same float rounding
    try:
        return train(_cfg(tmp_path_factory.mktemp("reference")))
    finally:
        torch.set_num_threads(threads)


def test_last_ckpt_is_the_last_epoch_even_when_val_acc_drops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning 2.6 rewrites a ``save_last`` file only on a top-k save; the shipped config
    writes last.ckpt with a second, metric-free ModelCheckpoint instead."""
    original = ImageClassifier._eval_step

    def worse_every_epoch(self: ImageClassifier, batch, stage: str) -> None:
        if stage != "val":
            return original(self, batch, stage)
        self.log("val/acc", 1.0 / (1 + self.current_epoch), on_epoch=True, batch_size=1)

    monkeypatch.setattr(ImageClassifier, "_eval_step", worse_every_epoch)
    train(_cfg(tmp_path, "trainer.max_epochs=3", "test=false"))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch000.ckpt", "last.ckpt"]
    last = _ckpt(ckpts / "last.ckpt")
    assert last["epoch"] == 2 and last["global_step"] == 3 * BATCHES  # the last, not the best
    assert _ckpt(ckpts / "epoch000.ckpt")["global_step"] == BATCHES  # the best: epoch 0


def test_resume_from_last_ckpt_continues_the_run(tmp_path: Path) -> None:
    """An interrupted run (here: one that stopped after epoch 0 of 2, its results removed)
    relaunched with ckpt_path=last trains only the missing epoch; the first launch used
    the same ckpt_path=last, with no checkpoint yet."""
    first = train(_cfg(tmp_path, "test=false", "ckpt_path=last"))
    assert first["status"] == "finished" and first["epochs"] == 1
    (tmp_path / "results.json").unlink()
    with pytest.raises(FileExistsError):  # a new 2-epoch run into it is refused...
        train(_cfg(tmp_path, "trainer.max_epochs=2", "test=false"))
    results = train(_cfg(tmp_path, "trainer.max_epochs=2", "test=false", "ckpt_path=last"))
    assert results["status"] == "finished" and results["epochs"] == 2
    assert _ckpt(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2 * BATCHES


def test_relaunch_of_a_finished_run_leaves_its_results_intact(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing of the finished run changes: results, reports, compact model, checkpoints,
    metrics. Its last.ckpt is the last epoch's dense model (the shipped checkpoints save at
    validation, before the fit-end projection and decomposition redone on relaunch)."""
    first = train(_cfg(tmp_path))
    assert first["status"] == "finished" and first["flops_reduction"] > 0.3
    last = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert _lrpet_state(last)["decomposed_ranks"] == {} and last["global_step"] == BATCHES
    before = _snapshot(tmp_path)  # metrics.csv among them: the CSV logger deletes it
    assert {"results.json", "compact_model.pt", "compression_report.json",
            "checkpoints/last.ckpt", "csv/metrics.csv"} <= before.keys()
    for ckpt_path in (tmp_path / "checkpoints" / "last.ckpt", "last"):
        with caplog.at_level(logging.INFO, logger="lrpet_lightning"):
            again = train(_cfg(tmp_path, f"ckpt_path={ckpt_path}"))
        assert again == {**first, "status": "already_finished"}
        assert _snapshot(tmp_path) == before
        assert "is a finished run" in caplog.text


def test_relaunch_of_a_finished_run_without_results_writes_no_fake_zero(
        tmp_path: Path, reference: dict) -> None:
    """With results.json gone, the relaunch redoes the fit end from last.ckpt and writes
    what it measures (the same as the run's own), null (never a default 0.0) for the rest."""
    train(_cfg(tmp_path))
    (tmp_path / "results.json").unlink()
    results = train(_cfg(tmp_path, "ckpt_path=last"))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == results and results["status"] == "already_finished"
    assert results["flops_reduction"] in (None, reference["flops_reduction"])
    for key in ("val_acc", "test_acc", "epochs", "num_projections"):
        assert results[key] == reference[key], key
    assert not results["errors"] and Path(results["compact_model"]).is_file()


def test_relaunch_after_decomposition_neither_crashes_nor_lies(
        tmp_path: Path, reference: dict) -> None:
    """A last.ckpt saved after decompose_on_fit_end (here by a callback saving at the very
    end, as a ModelCheckpoint on_train_end would) holds the thin model; relaunched with
    the same command, with or without results.json, the run reports what it measured."""
    keep = ["+callbacks.after_fit._target_=lifecycle_callbacks.SaveAfterFit",
            f"+callbacks.after_fit.dirpath={tmp_path / 'checkpoints'}"]
    first = train(_cfg(tmp_path, *keep))
    last = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert _lrpet_state(last)["decomposed_ranks"]  # the thin model
    assert any(k.endswith(".first.weight") for k in last["state_dict"])
    before = _snapshot(tmp_path)
    again = train(_cfg(tmp_path, *keep, "ckpt_path=last"))
    assert again == {**first, "status": "already_finished"} and _snapshot(tmp_path) == before
    (tmp_path / "results.json").unlink()
    redone = train(_cfg(tmp_path, *keep, "ckpt_path=last"))
    assert redone["status"] == "already_finished" and not redone["errors"]
    for key in ("val_acc", "test_acc", "epochs", "num_projections"):
        assert redone[key] == reference[key], key
    # Counted on the thin model against the dense architecture, not left out nor faked.
    assert redone["flops_reduction"] == pytest.approx(reference["flops_reduction"], abs=1e-12)
    compact = torch.load(redone["compact_model"], weights_only=True)
    assert compact["ranks"] == torch.load(first["compact_model"], weights_only=True)["ranks"]
    # Continued for one more epoch: the thin layers train on, nothing is projected or
    # counted twice, and the compression is the same.
    more = train(_cfg(tmp_path, *keep, "ckpt_path=last", "trainer.max_epochs=2"))
    assert more["status"] == "finished" and more["epochs"] == 2 and not more["errors"]
    assert more["num_projections"] == reference["num_projections"]
    assert more["flops_reduction"] == pytest.approx(reference["flops_reduction"], abs=1e-12)
    assert more["params_reduction"] == pytest.approx(reference["params_reduction"], abs=1e-12)


def test_a_second_run_into_a_used_dir_is_refused_unless_overwrite(tmp_path: Path) -> None:
    train(_cfg(tmp_path))
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a run.*overwrite=true"):
        train(_cfg(tmp_path, "seed=1"))
    assert _snapshot(tmp_path) == before  # nothing touched: results, checkpoints, model
    other = tmp_path.parent / f"{tmp_path.name}-other"  # a checkpoint from elsewhere too
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(_cfg(tmp_path, f"ckpt_path={other / 'last.ckpt'}"))
    assert _snapshot(tmp_path) == before
    results = train(_cfg(tmp_path, "seed=1", "overwrite=true"))
    assert results["status"] == "finished"
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["epoch000.ckpt", "last.ckpt"]  # no last-v1.ckpt beside a stale last.ckpt


@pytest.mark.parametrize("name", ["1", "results.json", "sub/model.pt", ".pt", "model.ckpt",
                                  "../model.pt"])
def test_compact_model_name_is_checked_before_training(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="compact_model_name must be a plain file name"):
        train(_cfg(tmp_path, f"compact_model_name={name}"))
    assert not (tmp_path / "checkpoints").exists()


def test_a_diverging_run_ends_with_status_diverged_and_finite_metrics(tmp_path: Path) -> None:
    results = train(_cfg(tmp_path, "trainer.max_epochs=3", "optim.lr=1e6"))
    written = json.loads((tmp_path / "results.json").read_text())  # valid JSON: no NaN
    assert written == results
    assert results["status"] == "diverged"
    assert results["diverged_at"]["loss"] in ("nan", "inf", "-inf")
    assert results["epochs"] < 3  # stopped, not trained to the end on NaN
    assert results["val_acc"] is None or 0.0 <= results["val_acc"] <= 1.0
    assert results["flops_reduction"] is None or results["flops_reduction"] > 0.0


def test_a_nan_loss_mid_run_keeps_the_weights_finite(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN loss is caught before its backward: the step is skipped, the fit stops, and
    the (finite) model is still decomposed, scored and saved."""
    original = ImageClassifier._loss

    def nan_from_step_4(self: ImageClassifier, batch):
        loss, logits, y = original(self, batch)
        if self.training and self.global_step >= 4:
            loss = loss * float("nan")
        return loss, logits, y

    monkeypatch.setattr(ImageClassifier, "_loss", nan_from_step_4)
    results = train(_cfg(tmp_path, "trainer.max_epochs=3"))
    assert results["status"] == "diverged"
    assert results["diverged_at"] == {"epoch": 1, "step": 4, "loss": "nan"}
    assert results["val_acc"] == results["last_finite_val"]["val/acc"]
    assert results["test_acc"] is not None and "compact_model" in results


def test_faults_after_training_are_recorded_not_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(app, "save_compact", disk_full)
    results = train(_cfg(tmp_path))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["status"] == "finished" and written["flops_reduction"] > 0.3
    assert [e["step"] for e in written["errors"]] == ["compact model"]
    assert "No space left on device" in written["errors"][0]["error"]
    assert "compact_model" not in results


def test_a_results_file_that_cannot_be_written_still_reaches_the_user(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    real = app._write

    def refuse_results(path, text):
        if Path(path).name == "results.json":
            raise OSError(28, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(app, "_write", refuse_results)
    with caplog.at_level(logging.ERROR, logger="lrpet_lightning.app.train"):
        with pytest.raises(OSError, match="No space left"):
            train(_cfg(tmp_path))
    logged = caplog.text[caplog.text.index("the results were:"):]
    results = json.loads(logged[logged.index("{"):logged.rindex("}") + 1])
    assert results["status"] == "finished" and results["flops_reduction"] > 0.3
    assert "FLOPs reduction" in capsys.readouterr().out  # the summary table printed too
    assert (tmp_path / "compact_model.pt").is_file()  # written before: not lost


def test_a_run_dir_made_read_only_at_fit_end_loses_nothing_and_relaunches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: dict) -> None:
    """The run dir turns read-only after the last epoch's checkpoint (simulated: writes
    below it raise PermissionError, as root ignores chmod). Lightning's CSV logger fails
    first, in the fit loop: train raises, with no results.json (none can be written) and the
    checkpoints intact; relaunched with the same command once the dir is writable again,
    the run redoes its fit end and ends with an untroubled run's results."""
    import builtins
    import io

    import lifecycle_callbacks

    real_os_open, real_open = os.open, builtins.open

    def refused(path: object) -> bool:
        if not isinstance(path, (str, os.PathLike)):
            return False
        path = Path(os.fsdecode(path)).resolve()
        return any(d == path or d in path.parents for d in lifecycle_callbacks.UNWRITABLE)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and refused(file):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    run = ["ckpt_path=last", "+callbacks.ro._target_=lifecycle_callbacks.ReadOnlyAtFitEnd",
           f"+callbacks.ro.path={tmp_path}"]
    try:
        with monkeypatch.context() as patch:
            for target, name, value in ((os, "open", os_open), (builtins, "open", open_),
                                        (io, "open", open_)):
                patch.setattr(target, name, value)
            with pytest.raises(PermissionError, match="Permission denied"):
                train(_cfg(tmp_path, *run))
    finally:
        lifecycle_callbacks.UNWRITABLE.clear()  # writable again
    assert not (tmp_path / "results.json").exists()  # no results.json is better than a lie
    last = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == BATCHES and _lrpet_state(last)["num_projections"] == 1
    again = train(_cfg(tmp_path, *run[:1]))
    assert json.loads((tmp_path / "results.json").read_text()) == again
    assert again["status"] == "already_finished" and not again["errors"]
    for key in ("val_acc", "test_acc", "epochs", "num_projections"):
        assert again[key] == reference[key], key
    assert again["flops_reduction"] in (None, reference["flops_reduction"])
    assert Path(again["compact_model"]).is_file()


def test_a_transient_solver_failure_at_the_last_projection_still_ends_exactly_low_rank(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: dict) -> None:
    """Every solver attempt for one layer fails at the last scheduled projection (and only
    there): the layer is skipped with a warning, the final projection makes every layer
    exactly rank r before the decomposition, and results.json reports the untroubled
    run's ranks, FLOPs and parameter reductions."""
    import lrpet_lightning.callback as callback_module
    from lrpet_lightning.core import transforms
    from lrpet_lightning.core.linalg import weight_to_matrix
    from lrpet_lightning.models import build_model

    net = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    shapes = {n: tuple(weight_to_matrix(m.weight).shape) for n, m in net.named_modules()
              if isinstance(m, torch.nn.Conv2d)}
    target = shapes["layer2.0.conv1"]
    assert list(shapes.values()).count(target) == 1  # the failure hits this layer alone
    solve, state = transforms.project_matrix, {"failing": True, "failed": 0}

    def flaky(M, *args, **kwargs):
        if state["failing"] and tuple(M.shape) == target:
            state["failed"] += 1
            raise torch.linalg.LinAlgError("simulated transient solver failure")
        state["failing"] = state["failing"] and not state["failed"]  # the next layer: over
        return solve(M, *args, **kwargs)

    real_decompose, seen = callback_module.decompose_, {}

    def checked_decompose(module, ranks, **kwargs):
        for name, rank in ranks.items():  # the final weights, just before decomposition
            w = weight_to_matrix(module.get_submodule(name).weight.detach())
            seen[name] = (int(torch.linalg.matrix_rank(w, rtol=1e-5)), rank)
        return real_decompose(module, ranks=ranks, **kwargs)

    monkeypatch.setattr(transforms, "project_matrix", flaky)
    monkeypatch.setattr(callback_module, "decompose_", checked_decompose)
    with pytest.warns(RuntimeWarning, match=r"layer2\.0\.conv1 failed and is skipped"):
        results = train(_cfg(tmp_path))
    assert state["failed"] >= 1 and not state["failing"]
    assert len(seen) == 19 and all(got <= rank for got, rank in seen.values()), seen
    assert results["status"] == "finished" and not results["errors"]
    # The untroubled run is exactly low rank after its one (scheduled) projection and skips
    # the final one; this run needs it.
    assert (reference["num_projections"], results["num_projections"]) == (1, 2)
    for key in ("flops_reduction", "params_reduction"):
        assert results[key] == pytest.approx(reference[key], rel=1e-12), key
    ours = json.loads(Path(results["report"]).read_text())["layers"]
    theirs = json.loads(Path(reference["report"]).read_text())["layers"]
    assert [(r["name"], r["rank"]) for r in ours] == [(r["name"], r["rank"]) for r in theirs]


def test_the_run_logs_what_it_trains_and_where(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lrpet_lightning"):
        train(_cfg(tmp_path))
    assert f"training resnet20 on DigitsDataModule for 1 epoch(s); outputs in {tmp_path}" \
        in caplog.text
    assert f"results in {tmp_path / 'results.json'}" in caplog.text


# ------------------------------------------------------------- kill and relaunch, for real
def _launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    """``python -m lrpet_lightning.app`` with the shipped configs, 3 epochs of 4 batches,
    ``ckpt_path=last``: the one command for the first launch and every relaunch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    log = open(run_dir.parent / f"{run_dir.name}.out", "a")
    return subprocess.Popen(
        [sys.executable, "-m", "lrpet_lightning.app", "trainer.max_epochs=3",
         "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1",
         "+trainer.limit_test_batches=2", "+trainer.enable_progress_bar=false",
         "~callbacks.progress_bar", "plot_compression=false", "ckpt_path=last",
         f"hydra.run.dir={run_dir}", *extra],
        cwd=run_dir.parent, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, run_dir: Path, rc: int) -> None:
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out = (run_dir.parent / f"{run_dir.name}.out").read_text()
    assert proc.returncode == rc, out[-4000:]


def _interrupt(run_dir: Path, sig: signal.Signals, at: str, waiter: list[str]) -> None:
    """Launch, wait until the run blocks at ``at`` (``wait.<at>`` appears: a global step
    mid-epoch, or ``projection<epoch>`` inside a projection), send ``sig``."""
    proc = _launch(run_dir, *waiter)
    marker = run_dir.parent / f"wait.{at}"
    deadline = time.monotonic() + 300
    try:
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, \
                (run_dir.parent / f"{run_dir.name}.out").read_text()[-4000:]
            time.sleep(0.05)
        proc.send_signal(sig)
        # SIGTERM: Lightning finishes the batch and exits with status 0, results unwritten.
        _wait(proc, run_dir, 0 if sig == signal.SIGTERM else -signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (run_dir / "results.json").exists()


@pytest.mark.slow  # five fresh interpreters: ~40 s on 2 idle cores, 2 min on busy ones
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_killed_mid_epoch_and_relaunched_with_the_same_command_ends_as_if_never_stopped(
        tmp_path: Path) -> None:
    """SIGKILL in epoch 1, SIGKILL inside epoch 1's projection (5 of 19 layers solved, none
    written), then SIGTERM in epoch 2, each relaunched with the very same command: the
    same compact weights, results and projection count as a run never stopped. Exact
    because the digits order and shifts are drawn from (seed, epoch, sample), and last.ckpt
    is every epoch's (the killed epoch is trained again)."""
    waiter = ["+callbacks.waiter._target_=lifecycle_callbacks.WaitAt",
              "+callbacks.waiter.steps=[6,10]", f"+callbacks.waiter.marker={tmp_path / 'wait'}",
              "+callbacks.waiter.project_epochs=[1]", "+callbacks.waiter.after_layers=5"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    reference = _launch(straight)  # alongside the first launch of the other (two cores)
    try:
        _interrupt(stopped, signal.SIGKILL, "6", waiter)  # epoch 1, batch 2 of 4
        _interrupt(stopped, signal.SIGKILL, "projection1", waiter)  # epoch 1's projection
        # Killed mid-projection: on disk is epoch 0's checkpoint, projected once.
        last = _ckpt(stopped / "checkpoints" / "last.ckpt")
        assert last["global_step"] == 4 and _lrpet_state(last)["num_projections"] == 1
        _interrupt(stopped, signal.SIGTERM, "10", waiter)  # epoch 2, batch 2 of 4
        final = _launch(stopped, *waiter)
        _wait(final, stopped, 0)
        _wait(reference, straight, 0)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((stopped / "results.json").read_text())
    assert b["status"] == "finished" and b["epochs"] == 3 and b["num_projections"] == 3
    paths = ("output_dir", "report", "compact_model", "wall_time_s")
    assert {k: v for k, v in b.items() if k not in paths} == \
        {k: v for k, v in a.items() if k not in paths}
    wa = torch.load(straight / "compact_model.pt", weights_only=True)["state_dict"]
    wb = torch.load(stopped / "compact_model.pt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # Nothing of an earlier launch is lost: each one's metrics, and one log of them all.
    csv_dir = stopped / "csv"
    # The launch killed mid-projection had written no metrics yet (Lightning's CSV logger
    # buffers them): two earlier launches left a metrics.csv to keep.
    assert sorted(p.name for p in csv_dir.glob("metrics*.csv")) == \
        ["metrics-launch1.csv", "metrics-launch2.csv", "metrics.csv"]
    log_text = (stopped / "train.log").read_text()
    assert log_text.count("training resnet20 on DigitsDataModule") == 4
    assert "LRPET: projecting 19 layer(s) every 1 epoch(s)" in log_text  # Lightning's logger
    assert f"results in {stopped / 'results.json'}" in log_text


def test_lrpet_train_sends_lightnings_messages_to_train_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """Lightning stops its own logger's records from reaching the root logger (Hydra's
    train.log) when imported first; the app's Hydra task lets them through."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    lightning_log = logging.getLogger("lightning.pytorch")
    saved = lightning_log.propagate, list(lightning_log.handlers)
    try:
        lightning_log.propagate = False  # as Lightning leaves it, imported before logging
        with caplog.at_level(logging.INFO):
            rank_zero_info("LRPET: lost")
            app._route_lightning_logs()
            rank_zero_info("LRPET: a message for train.log")
        assert caplog.messages == ["LRPET: a message for train.log"]
    finally:
        lightning_log.propagate = saved[0]
        lightning_log.handlers[:] = saved[1]


# ---------------------------------------------------------------- output dir and inputs
def test_an_unwritable_output_dir_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match="is not writable.*nothing was trained"):
        train(_cfg(blocker / "run"))
    if os.geteuid() != 0:  # root writes into read-only dirs anyway
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            with pytest.raises(OSError, match=f"output_dir '{locked}' is not writable"):
                train(_cfg(locked))
        finally:
            locked.chmod(0o755)
        assert not list(locked.iterdir())


def test_the_compact_model_records_its_inputs_and_refuses_others(tmp_path: Path) -> None:
    from lrpet_lightning.app.compact import load_compact_datamodule, load_compact_model
    from lrpet_lightning.app.data import DigitsDataModule
    from lrpet_lightning.core.checkpoint import read_compact

    results = train(_cfg(tmp_path, "test=false"))
    path = Path(results["compact_model"])
    spec = read_compact(path)["metadata"]["input_spec"]
    assert spec["image_size"] == 16 and spec["class_names"] == [str(d) for d in range(10)]
    model = load_compact_model(path)
    with pytest.raises(ValueError, match=r"trained on 1x16x16 inputs .* got 1x32x32"):
        model(torch.zeros(2, 1, 32, 32))  # DigitsDataModule()'s default size
    with pytest.raises(ValueError, match=r"image_size=32 \(the run: 16\).*"
                                         r"load_compact_datamodule"):
        load_compact_model(path, datamodule=DigitsDataModule())
    datamodule = load_compact_datamodule(path)
    load_compact_model(path, datamodule=datamodule)  # the run's own data: accepted
    datamodule.setup("fit")
    x, y = next(iter(datamodule.val_dataloader()))
    assert (model(x).argmax(1) == y).float().mean().item() == pytest.approx(
        results["val_acc"], abs=1e-6)  # limit_val_batches=1: the same batch


def test_a_fault_at_fit_end_is_recorded_and_a_relaunch_redoes_the_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: dict) -> None:
    """The callback's decomposition fails after training: results.json says so (status
    failed, no FLOPs figure, no compact model); relaunched with ckpt_path=last, the app
    decomposes the checkpoint's weights itself and measures the report it writes."""
    import lrpet_lightning.callback as callback_module

    clean = reference
    def broken(*args, **kwargs):
        raise RuntimeError("simulated solver failure")

    with monkeypatch.context() as patch:
        patch.setattr(callback_module, "decompose_", broken)
        failed = train(_cfg(tmp_path / "run", "test=false"))
    assert failed["status"] == "failed" and failed["flops_reduction"] is None
    assert failed["errors"][0]["step"] == "fit end"
    assert "simulated solver failure" in failed["errors"][0]["error"]
    assert "compact_model" not in failed
    again = train(_cfg(tmp_path / "run", "test=false", "ckpt_path=last"))
    assert again["status"] == "already_finished" and not again["errors"]
    assert again["flops_reduction"] == pytest.approx(clean["flops_reduction"], rel=1e-12)
    assert again["val_acc"] == pytest.approx(clean["val_acc"], abs=1e-6)
    assert Path(again["compact_model"]).is_file()


def test_the_lightning_range_pyproject_claims_is_the_one_installed() -> None:
    """The checkpoint semantics above are Lightning 2.6.6's; pyproject.toml must not allow
    a version they were not checked on."""
    import lightning
    from packaging.requirements import Requirement

    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    line = next(x for x in pyproject.splitlines() if x.strip().startswith('"lightning'))
    requirement = Requirement(line.strip().split('"')[1])
    assert lightning.__version__ in requirement.specifier
    assert not requirement.specifier.contains("2.7.0") and not requirement.specifier.contains(
        "2.5.0")


# ------------------------------------------------------------------ docs/resume.md, pinned
def test_every_sentence_of_the_resume_page_is_pinned_by_a_test() -> None:
    """Each sentence of docs/resume.md begins as one key of lifecycle_pins.PINS does, each
    key is used once, and each test it names exists: editing the page, or dropping a test,
    fails here."""
    import lifecycle_pins

    pins = lifecycle_pins.PINS
    sentences = lifecycle_pins.sentences(lifecycle_pins.RESUME_PAGE.read_text())
    assert len(sentences) >= 20
    for sentence in sentences:
        keys = [key for key in pins if sentence.startswith(key)]
        assert len(keys) == 1, f"docs/resume.md: no (or no single) test pins {sentence!r}"
    for key in pins:
        assert sum(s.startswith(key) for s in sentences) == 1, f"not on the page: {key!r}"
    for names in pins.values():
        for name in names:
            module, _, function = name.rpartition("::")
            source = (HERE / (module or Path(__file__).name)).read_text()
            assert f"\ndef {function}(" in source, f"no test {name}"
    statuses = next(s for s in sentences if s.startswith("`status` is"))
    assert statuses.count('`"') == len(app.STATUSES)
    assert all(f'`"{status}"`' in statuses for status in app.STATUSES)
