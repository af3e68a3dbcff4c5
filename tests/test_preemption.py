"""Resume and preemption: a real training process is killed mid-epoch (SIGTERM, SIGKILL) or
asked to requeue by SLURM (SIGUSR1), then resumed from its checkpoint, and must end with the
same weights and projection count as an uninterrupted run.

Each run is a subprocess executing ``SCRIPT`` (written into ``tmp_path``). The signal comes
from the test process, as a scheduler's would; the script only waits at a chosen point of
the loop (``--wait-at STEP``) after writing a marker file, so where the signal lands is
deterministic.

What Lightning 2.6 does (checked here):
- SIGTERM, outside SLURM: its handler only sets ``trainer.received_sigterm``; the current
  batch finishes (its ``on_train_batch_end`` hooks, ModelCheckpoint included, run), then the
  loop raises ``SIGTERMException``, a ``SystemExit`` without a code: the process exits with
  status 0 and the code after ``trainer.fit`` does not run. No extra checkpoint is saved.
- SIGKILL: the process dies at once (status -9); the last checkpoint written survives.
- SIGUSR1 under SLURM (``SLURMEnvironment(auto_requeue=True)``, auto-detected from the
  ``SLURM_*`` variables): saves ``<default_root_dir>/hpc_ckpt_<n>.ckpt``, runs ``scontrol
  requeue <job id>`` and *keeps training*; SLURM then ends the job with SIGTERM (our fake
  ``scontrol`` sends it). The requeued run, with ``fit(ckpt_path=None)``, resumes from the
  newest ``hpc_ckpt_*.ckpt`` by itself.
- Mid-epoch resume is exact only if the train DataLoader is stateful (``state_dict`` /
  ``load_state_dict``): Lightning restores the loop counters but not a plain DataLoader's
  position, so the resumed epoch restarts the loader from its first batch and stops after
  the number of batches that were left. Lightning does not checkpoint RNG states either, so
  the shuffling must be seeded by the epoch (``set_epoch``), not by the global generator.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

if sys.platform == "win32":
    pytest.skip("POSIX signals (SIGKILL, SIGUSR1)", allow_module_level=True)

BATCHES, EPOCHS = 6, 4  # 24 optimizer steps
WAIT_AT = 9  # global step where the run is interrupted: mid-epoch 1 (batch 3 of 6)
SCHEDULES = {"epoch": ["--every-n-epochs", "1"], "step": ["--every-n-train-steps", "2"]}
TIMEOUT = 120  # seconds, for any one subprocess

SCRIPT = r'''
"""Tiny conv+BN classifier trained with LowRankProjectionCallback; see test_preemption.py."""
import argparse, json, os, sys, time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lrpet_lightning import LowRankProjectionCallback

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--every-n-epochs", type=int)
p.add_argument("--every-n-train-steps", type=int)
p.add_argument("--loader", choices=["resumable", "plain"], default="resumable")
p.add_argument("--ckpt-path")
p.add_argument("--wait-at", type=int)  # global step where the run waits for a signal
p.add_argument("--wait-hook", choices=["start", "end"], default="start")  # of that batch
args = p.parse_args()
torch.set_num_threads(1)  # bitwise-reproducible CPU kernels from run to run


class EpochShuffle(Sampler):
    """Shuffles by seed + epoch (like DistributedSampler): Lightning calls set_epoch and
    does not checkpoint RNG states, so a global-generator shuffle would not resume."""

    def __init__(self, n):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):  # a generator: the order is drawn at the first batch, after set_epoch
        g = torch.Generator().manual_seed(1000 + self.epoch)
        yield from torch.randperm(self.n, generator=g).tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints (it is ``_Stateful``): it remembers how many
    batches of the epoch it yielded and skips them after a restore. Lightning does not
    prefetch from a loader with a length, so "yielded" is "consumed by the loop"."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self._yielded, self._skip = 0, 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._yielded = 0
        for i, batch in enumerate(super().__iter__()):  # drawn and dropped: same order
            self._yielded = i + 1
            if i >= skip:
                yield batch

    def state_dict(self):
        return {"yielded": self._yielded}

    def load_state_dict(self, state):
        self._skip = state["yielded"] % len(self)  # saved after the last batch: start over


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(8 * BATCHES, 3, 6, 6, generator=g)
        self.y = torch.randint(0, 4, (8 * BATCHES,), generator=g)
        self.batches = []  # [global_step, sample indices] of every batch this process ran

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.batches.append([self.trainer.global_step, index.tolist()])
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        cls = ResumableDataLoader if args.loader == "resumable" else DataLoader
        index = torch.arange(len(self.x))
        return cls(TensorDataset(self.x, self.y, index), batch_size=8,
                   sampler=EpochShuffle(len(self.x)))


class Recorder(LowRankProjectionCallback):
    """Records (global_step, epoch, final) of every projection this process ran."""

    calls = []

    def _project(self, trainer, pl_module, config=None, final=False):
        self.calls.append([trainer.global_step, trainer.current_epoch, final])
        super()._project(trainer, pl_module, config=config, final=final)


class WaitForSignal(L.Callback):
    """At global step ``--wait-at`` (at the start or end of that batch), writes
    <out>/waiting and blocks until Lightning's SIGTERM handler has set its flag, or until
    the process is killed."""

    def _wait(self, trainer):
        if trainer.global_step != args.wait_at or os.path.exists(marker):
            return
        open(marker, "w").close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if trainer.received_sigterm:
                return
            time.sleep(0.01)
        sys.exit(3)  # no signal came: fail loudly

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if args.wait_hook == "start":
            self._wait(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if args.wait_hook == "end":
            self._wait(trainer)


os.makedirs(args.out, exist_ok=True)
marker = os.path.join(args.out, "waiting")
L.seed_everything(0, verbose=False)
model = Model()
lrpet = Recorder(rank_ratio=0.5, every_n_epochs=args.every_n_epochs,
                 every_n_train_steps=args.every_n_train_steps, report=False)
callbacks = [lrpet]  # the waiter comes after LRPET: a projection of that batch is done
if args.wait_at is not None:
    callbacks.append(WaitForSignal())
callbacks.append(ModelCheckpoint(dirpath="ckpt", save_last=True, save_top_k=0,
                                 every_n_train_steps=1))
trainer = L.Trainer(accelerator="cpu", devices=1, deterministic=True, max_epochs=EPOCHS,
                    enable_progress_bar=False, enable_model_summary=False, logger=False,
                    default_root_dir=".", callbacks=callbacks)
trainer.fit(model, ckpt_path=args.ckpt_path)
torch.save(model.state_dict(), os.path.join(args.out, "weights.pt"))
with open(os.path.join(args.out, "result.json"), "w") as f:
    json.dump({"num_projections": lrpet.num_projections, "calls": Recorder.calls,
               "global_step": trainer.global_step, "ckpt_path": trainer.ckpt_path,
               "batches": model.batches}, f)
'''.replace("BATCHES", str(BATCHES)).replace("EPOCHS", str(EPOCHS))


# ------------------------------------------------------------------------------ helpers
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def _start(workdir: Path, out: str, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.Popen:
    """Starts the script; its output goes to ``<workdir>/<out>.log`` (a pipe left unread
    while the test waits could fill up and block it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "train_tiny.py"
    script.write_text(SCRIPT)
    with open(workdir / f"{out}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(script), "--out", out, *args],
                                cwd=workdir, env=env or _env(), stdout=log,
                                stderr=subprocess.STDOUT)
    proc.log = workdir / f"{out}.log"  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, expect_rc: int | None = 0, timeout: float = TIMEOUT
            ) -> str:
    """Waits for ``proc`` (killing it past ``timeout``) and returns its output."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the training subprocess timed out:\n{proc.log.read_text()}")
    output = proc.log.read_text()
    if expect_rc is not None:
        assert proc.returncode == expect_rc, output
    return output


def run(workdir: Path, out: str, *args: str, env: dict[str, str] | None = None
        ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Runs the script to the end; its final weights, result.json and output."""
    output = _finish(_start(workdir, out, *args, env=env))
    return (*_outputs(workdir / out), output)


def _outputs(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return (torch.load(out / "weights.pt", weights_only=True),
            json.loads((out / "result.json").read_text()))


def interrupt(workdir: Path, out: str, sig: signal.Signals, *args: str, at: int = WAIT_AT,
              env: dict[str, str] | None = None, expect_rc: int | None = 0) -> str:
    """Starts the script, waits until it blocks at global step ``at``, sends ``sig``, and
    returns its output once it has exited with ``expect_rc``."""
    proc = _start(workdir, out, "--wait-at", str(at), *args, env=env)
    marker = workdir / out / "waiting"
    try:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run never reached step {at}:\n{_finish(proc, None, 0)}")
            time.sleep(0.05)
        proc.send_signal(sig)
    except BaseException:
        if proc.poll() is None:  # the test failed or was interrupted while it waited
            proc.kill()
            proc.wait()
        raise
    output = _finish(proc, expect_rc)
    assert not (workdir / out / "result.json").exists(), "the code after fit() ran"
    return output


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:  # parameters and buffers (BN running statistics and counters)
        assert torch.equal(a[key], b[key]), key


def conv_ranks(weights: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k: int(torch.linalg.matrix_rank(w.flatten(1).double(), rtol=1e-5))
            for k, w in weights.items() if k.endswith("weight") and w.dim() == 4}


def lrpet_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("Recorder")]
    return state


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted run of each schedule: final weights and result.json. Both runs
    start at once (two cores) and are awaited when first needed."""
    procs = {}
    for schedule, args in SCHEDULES.items():
        workdir = tmp_path_factory.mktemp(f"straight-{schedule}")
        procs[schedule] = workdir, _start(workdir, "out", *args)
    cache: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}

    def get(schedule: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if schedule not in cache:
            workdir, proc = procs[schedule]
            _finish(proc)
            weights, result = _outputs(workdir / "out")
            assert result["global_step"] == BATCHES * EPOCHS
            assert set(conv_ranks(weights).values()) == {4}  # exactly rank 0.5 * 8
            cache[schedule] = weights, result
        return cache[schedule]

    yield get
    for _, proc in procs.values():  # never leave one behind (a test failed before waiting)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- 1. SIGTERM and SIGKILL
@pytest.mark.slow
@pytest.mark.parametrize(
    ("schedule", "sig", "at"),
    [
        ("epoch", signal.SIGTERM, WAIT_AT),
        ("epoch", signal.SIGKILL, WAIT_AT),
        ("step", signal.SIGTERM, WAIT_AT),
        ("step", signal.SIGKILL, WAIT_AT),
        # In the epoch's last batch: the checkpoint holds the projection that batch ran, and
        # Lightning resumes at the next epoch without calling on_train_epoch_end (nothing
        # may project twice).
        ("epoch", signal.SIGTERM, BATCHES - 1),
    ],
    ids=["epoch-SIGTERM", "epoch-SIGKILL", "step-SIGTERM", "step-SIGKILL",
         "epoch-SIGTERM-last-batch"],
)
def test_killed_then_resumed_from_last_is_exact(
        tmp_path: Path, reference, schedule: str, sig: signal.Signals, at: int) -> None:
    straight, straight_result = reference(schedule)
    # SIGTERM: Lightning finishes the batch, checkpoints it and exits with status 0.
    # SIGKILL: the process dies where it waits, before the batch that starts at step `at`.
    output = interrupt(tmp_path, "killed", sig, *SCHEDULES[schedule], at=at,
                       expect_rc=0 if sig == signal.SIGTERM else -signal.SIGKILL)
    saved_step = at + 1 if sig == signal.SIGTERM else at
    if sig == signal.SIGTERM:
        assert "Received SIGTERM" in output

    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == saved_step
    assert last["epoch"] == (saved_step - 1) // BATCHES  # saved within that epoch
    state = lrpet_state(last)
    projected = [c for c in straight_result["calls"] if c[0] <= saved_step]
    assert state["num_projections"] == len(projected) >= 1
    assert state["last_projected_step"] == projected[-1][0]

    resumed, result, _ = run(tmp_path, "resumed", *SCHEDULES[schedule],
                             "--ckpt-path", "ckpt/last.ckpt")
    assert_same_weights(straight, resumed)
    assert result["num_projections"] == straight_result["num_projections"]
    assert result["calls"] == [c for c in straight_result["calls"] if c[0] > saved_step]
    # The data loader resumed where it stopped: exactly the batches not trained on yet.
    assert result["batches"] == straight_result["batches"][saved_step:]
    assert result["global_step"] == BATCHES * EPOCHS


@pytest.mark.slow
def test_plain_dataloader_resumes_the_schedule_but_not_the_data(
        tmp_path: Path, reference) -> None:
    """A plain DataLoader has no state, so exact mid-epoch resume is impossible: Lightning
    restores the loop counters, warns, restarts the loader at the epoch's *first* batch and
    stops after the number of batches that were left. The weights then differ; what holds
    exactly is the LRPET schedule (same projections at the same steps), the data from the
    next epoch on, and an exactly low-rank model at the end."""
    # The resumable loader yields what the plain one does until it is restored: the
    # uninterrupted runs of the two are the same run.
    straight, straight_result = reference("step")
    interrupt(tmp_path, "killed", signal.SIGKILL, *SCHEDULES["step"], "--loader", "plain",
              expect_rc=-signal.SIGKILL)
    resumed, result, output = run(tmp_path, "resumed", *SCHEDULES["step"], "--loader", "plain",
                                  "--ckpt-path", "ckpt/last.ckpt")
    assert "dataloader is not resumable" in " ".join(output.split())
    # Steps 9-11 (batches 3-5 of epoch 1) replay epoch 1's batches 0-2, trained at steps 6-8.
    batches = straight_result["batches"]  # [step, sample indices] for steps 0-23
    epoch_start = WAIT_AT // BATCHES * BATCHES  # step 6
    next_epoch = epoch_start + BATCHES  # step 12
    replayed = [[step, batches[epoch_start + step - WAIT_AT][1]]
                for step in range(WAIT_AT, next_epoch)]
    assert result["batches"] == replayed + batches[next_epoch:]
    assert result["num_projections"] == straight_result["num_projections"]
    assert result["calls"] == [c for c in straight_result["calls"] if c[0] > WAIT_AT]
    assert result["global_step"] == BATCHES * EPOCHS
    assert conv_ranks(resumed) == conv_ranks(straight)
    assert any(not torch.equal(straight[k], resumed[k]) for k in straight)


# ---------------------------------------------------------------------- 2. SLURM requeue
@pytest.mark.slow
def test_slurm_requeue_saves_hpc_checkpoint_and_resumes_exactly(
        tmp_path: Path, reference) -> None:
    """SIGUSR1 as SLURM sends it before the time limit: Lightning writes hpc_ckpt_1.ckpt
    (with the LRPET state) and calls ``scontrol requeue``; the requeued job, started with
    the same command, resumes from it by itself and ends as if never interrupted."""
    straight, straight_result = reference("step")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    # Records its arguments, then ends the job the way SLURM does: SIGTERM to the task.
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\nkill -TERM "$PPID"\n')
    scontrol.chmod(0o755)
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               SCONTROL_LOG=str(tmp_path / "scontrol.log"),
               SLURM_NTASKS="1", SLURM_JOB_NAME="lrpet", SLURM_JOB_ID="4242",
               SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    # At the end of the batch that reached step 10, after its projection: a batch boundary.
    output = interrupt(tmp_path, "job", signal.SIGUSR1, *SCHEDULES["step"],
                       "--wait-hook", "end", at=WAIT_AT + 1, env=env)
    assert "Handling auto-requeue signal" in output
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]

    hpc = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)
    assert hpc["global_step"] == WAIT_AT + 1 and hpc["epoch"] == 1
    state = lrpet_state(hpc)
    projected = [c for c in straight_result["calls"] if c[0] <= WAIT_AT + 1]
    assert state["num_projections"] == len(projected) == 5  # steps 2, 4, 6, 8, 10
    assert state["last_projected_step"] == WAIT_AT + 1
    assert set(conv_ranks(hpc["state_dict"]).values()) == {4}  # saved right after it

    resumed, result, _ = run(tmp_path, "requeued", *SCHEDULES["step"], env=env)
    assert Path(result["ckpt_path"]).resolve() == (tmp_path / "hpc_ckpt_1.ckpt").resolve()
    assert_same_weights(straight, resumed)
    assert result["num_projections"] == straight_result["num_projections"]
    assert result["calls"] == [c for c in straight_result["calls"] if c[0] > WAIT_AT + 1]
