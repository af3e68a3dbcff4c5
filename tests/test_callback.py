"""LowRankProjectionCallback on a tiny conv net: schedule, exact rank, BN tracing without an
extra forward pass, validation/checkpoints after a projection, logging, resume, decomposition,
precision / torch.compile / other callbacks / LightningCLI, refused strategies, bad arguments,
and the user-story example."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

# Re-exported too: other test files import them from here.
from helpers import CONVS, RANK, Tiny, conv_ranks, make_trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lrpet_lightning import FactorizedConv, decompose_, decomposed_ranks
from lrpet_lightning.callback import LowRankProjectionCallback

REPO = Path(__file__).resolve().parents[1]


class Recorder(LowRankProjectionCallback):
    """Records every projection as ``(global_step, epoch, final)`` and every schedule query."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, int, bool]] = []
        self.queries: list[int] = []

    def should_project(self, step: int, epoch: int) -> bool:
        self.queries.append(step if self.every_n_train_steps else epoch)
        return super().should_project(step, epoch)

    def _project(self, trainer: L.Trainer, pl_module: L.LightningModule,
                 config: Any = None, final: bool = False) -> None:
        self.calls.append((trainer.global_step, trainer.current_epoch, final))
        super()._project(trainer, pl_module, config=config, final=final)

    def scheduled(self, index: int) -> list[int]:
        return [c[index] for c in self.calls if not c[2]]

    @property
    def final(self) -> bool:
        return any(c[2] for c in self.calls)


# ------------------------------------------------------------------------------ 1. schedule
@pytest.mark.parametrize(
    ("kwargs", "max_epochs", "epochs", "final"),
    [
        ({}, 3, [0, 1, 2], False),  # the default: every epoch
        ({"every_n_epochs": 1}, 3, [0, 1, 2], False),
        ({"every_n_epochs": 2}, 3, [1], True),
        ({"every_n_epochs": 2}, 4, [1, 3], False),
        ({"every_n_epochs": 1, "start": 1, "stop": 3}, 5, [1, 2], True),  # warm-up and stop
        ({"every_n_epochs": 2, "residual_scale": 0.5}, 2, [1], True),  # not exactly low rank
        ({"every_n_epochs": 1, "final_projection": False}, 2, [0, 1], False),
    ],
)
def test_epoch_schedule(kwargs: dict, max_epochs: int, epochs: list[int], final: bool) -> None:
    cb = Recorder(rank_ratio=0.25, report=False, **kwargs)
    make_trainer([cb], max_epochs=max_epochs).fit(Tiny())
    assert cb.scheduled(1) == epochs
    # On the epoch's last batch: after all of the epoch's 4 optimizer steps.
    assert cb.scheduled(0) == [4 * (e + 1) for e in epochs]
    assert cb.final is final
    assert cb.num_projections == len(epochs) + final


def test_epoch_schedule_with_limit_train_batches() -> None:
    cb = Recorder(rank_ratio=0.25, report=False)
    make_trainer([cb], max_epochs=2, limit_train_batches=2).fit(Tiny(n_batches=4))
    assert cb.calls == [(2, 0, False), (4, 1, False)]


@pytest.mark.parametrize(
    ("kwargs", "accumulate", "max_epochs", "steps", "final"),
    [
        ({"every_n_train_steps": 3}, 1, 2, [3, 6], True),  # 8 optimizer steps in all
        ({"every_n_train_steps": 2, "start": 3, "stop": 7}, 1, 2, [4, 6], True),
        ({"every_n_train_steps": 2}, 1, 2, [2, 4, 6, 8], False),
        # 4 batches per epoch, 2 per optimizer step: 2 steps per epoch, 6 in all.
        ({"every_n_train_steps": 3}, 2, 3, [3, 6], False),
        ({"every_n_train_steps": 1}, 2, 2, [1, 2, 3, 4], False),
    ],
)
def test_step_schedule_counts_optimizer_steps(
    kwargs: dict, accumulate: int, max_epochs: int, steps: list[int], final: bool
) -> None:
    cb = Recorder(rank_ratio=0.25, report=False, **kwargs)
    trainer = make_trainer([cb], max_epochs=max_epochs, accumulate_grad_batches=accumulate)
    trainer.fit(Tiny())
    assert cb.scheduled(0) == steps
    # Asked once per optimizer step, right after it (never on an accumulating batch).
    assert cb.queries == list(range(1, trainer.global_step + 1))
    assert cb.final is final


def test_custom_should_project_is_honoured() -> None:
    class EvenEpochs(Recorder):
        def should_project(self, step: int, epoch: int) -> bool:
            return epoch in (0, 2)

    class EveryFifthStep(Recorder):
        def should_project(self, step: int, epoch: int) -> bool:
            return step % 5 == 0

    # Two callbacks on disjoint layers (overlapping targets are refused).
    epochs = EvenEpochs(rank_ratio=0.25, report=False, include="net.conv1")
    steps = EveryFifthStep(rank_ratio=0.25, every_n_train_steps=1, report=False,
                           exclude="net.conv1")
    make_trainer([epochs, steps], max_epochs=4).fit(Tiny())
    assert epochs.scheduled(1) == [0, 2] and epochs.final
    assert steps.scheduled(0) == [5, 10, 15] and steps.final


# ------------------------------------------------------------------- 2. exact rank at the end
@pytest.mark.parametrize(
    ("kwargs", "final"),
    [({"every_n_epochs": 2}, True), ({"every_n_epochs": 1}, False),
     ({"every_n_epochs": 1, "residual_scale": 0.3}, True),
     ({"every_n_train_steps": 5, "include_linear": True}, True)],
)
def test_fit_ends_exactly_low_rank_in_the_same_parameters(kwargs: dict, final: bool) -> None:
    model = Tiny()
    params = {name: id(p) for name, p in model.named_parameters()}
    cb = Recorder(rank_ratio=0.25, report=False, **kwargs)
    trainer = make_trainer([cb], max_epochs=3)
    trainer.fit(model)
    assert cb.final is final
    assert conv_ranks(model) == dict.fromkeys(CONVS, RANK)
    fc_rank = int(torch.linalg.matrix_rank(model.net.fc.weight.detach(), rtol=1e-5))
    assert fc_rank == (1 if kwargs.get("include_linear") else 4)  # rank_ratio 0.25 of 4
    # Written in place: the same Parameter objects, still those the optimizer steps.
    assert {name: id(p) for name, p in model.named_parameters()} == params
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == set(params.values())
    assert all(r.skipped is None for r in cb.last_records)


def test_first_and_last_records_are_kept_and_reset_per_fit() -> None:
    model = Tiny()
    cb = LowRankProjectionCallback(rank_ratio=0.25, report=False)
    make_trainer([cb], max_epochs=3).fit(model)
    assert cb.num_projections == 3
    # The first projection takes energy from a full-rank init; the last finds the weights
    # near rank r already.
    first = {r.name: r.kept_energy for r in cb.first_records}
    last = {r.name: r.kept_energy for r in cb.last_records}
    assert first.keys() == last.keys() and all(first[n] < last[n] for n in first)
    make_trainer([cb], max_epochs=1).fit(Tiny())  # a new fit starts its own record
    assert [r.kept_energy for r in cb.first_records] == [r.kept_energy for r in cb.last_records]


@pytest.mark.parametrize("schedule", [{"every_n_epochs": 2}, {"every_n_train_steps": 3}])
def test_one_instance_serves_two_fits(schedule: dict) -> None:
    cb = Recorder(rank_ratio=0.25, report=False, **schedule)
    first, second = Tiny(), Tiny()
    make_trainer([cb], max_epochs=2).fit(first)
    calls = len(cb.calls)
    make_trainer([cb], max_epochs=2).fit(second)  # a new Trainer: its steps restart at 0
    assert cb.calls[calls:] == cb.calls[:calls]  # the same schedule again, on the new model
    assert conv_ranks(second) == dict.fromkeys(CONVS, RANK)


def test_projection_keeps_optimizer_momentum() -> None:
    model = Tiny()
    trainer = make_trainer([LowRankProjectionCallback(rank_ratio=0.25, report=False)])
    trainer.fit(model)
    state = trainer.optimizers[0].state[model.net.conv2.weight]
    assert state["momentum_buffer"].abs().sum() > 0


# ------------------------------------------------------- 3. BN pairs traced in the first step
def test_bn_pairs_traced_in_first_training_step_without_extra_forward() -> None:
    def forwards(callbacks: list) -> tuple[int, LowRankProjectionCallback | None]:
        model = Tiny()
        make_trainer(callbacks, max_epochs=2, num_sanity_val_steps=1).fit(model)
        return model.net.calls, (callbacks or [None])[0]

    plain, _ = forwards([])
    counted, cb = forwards([LowRankProjectionCallback(rank_ratio=0.25)])  # report on
    assert counted == plain == 1 + 2 * (4 + 1)  # sanity + 2 x (train + val batches)
    assert cb is not None
    assert {r.name: r.bn_rectified for r in cb.last_records} == {
        "net.conv1": True, "net.conv2": True, "net.conv3": False}


def test_hooks_are_removed_when_the_first_step_fails() -> None:
    class Failing(Tiny):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self(batch[0])
            raise RuntimeError("boom")

    model = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer([LowRankProjectionCallback(rank_ratio=0.25)]).fit(model)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


# ------------------------------------------- 4. validation and checkpoints see the projection
def test_validation_and_checkpoint_of_a_projected_epoch_are_low_rank(tmp_path: Path) -> None:
    model = Tiny()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    cb = LowRankProjectionCallback(rank_ratio=0.25, every_n_epochs=2, report=False)
    make_trainer([cb, ckpt], max_epochs=3, enable_checkpointing=True,
                 num_sanity_val_steps=1).fit(model)

    def projected(ranks: dict[str, int]) -> bool:
        if all(r == RANK for r in ranks.values()):
            return True
        assert all(r > RANK for r in ranks.values()), ranks  # all projected, or none
        return False

    (sanity, sanity_ranks), *epochs = model.val_ranks
    assert sanity and not projected(sanity_ranks)  # the sanity check precedes any projection
    # Projected on epoch 1's last batch only: its validation and its checkpoint see rank r.
    assert [projected(ranks) for _, ranks in epochs] == [False, True, False]
    for epoch, expected in enumerate([False, True, False]):
        state = torch.load(tmp_path / f"epoch={epoch}.ckpt", weights_only=False)
        assert projected({n: int(torch.linalg.matrix_rank(
            state["state_dict"][f"{n}.weight"].flatten(1), rtol=1e-5)) for n in CONVS}) is expected
        assert state["callbacks"][cb.state_key]["num_projections"] == (0 if epoch < 1 else 1)


# ------------------------------------------------------------------------------- 5. logging
@pytest.mark.parametrize("log_per_layer", [False, True])
def test_metrics_and_report_are_logged(tmp_path: Path, log_per_layer: bool) -> None:
    logger = CSVLogger(tmp_path)
    cb = LowRankProjectionCallback(rank_ratio=0.25, log_per_layer=log_per_layer)
    trainer = make_trainer([cb], max_epochs=2, logger=logger)
    trainer.fit(Tiny())
    with open(os.path.join(trainer.log_dir, "metrics.csv")) as f:
        header = f.readline().strip().split(",")
    expected = {"lrpet/projection_time_s", "lrpet/mean_kept_energy",
                "lrpet/mean_relative_change", "lrpet/flops_reduction",
                "lrpet/params_reduction", "lrpet/num_projections"}
    assert expected <= set(header)
    per_layer = {f"lrpet/{what}/{n}" for what in ("kept_energy", "relative_change") for n in CONVS}
    assert (per_layer <= set(header)) is log_per_layer
    assert bool(per_layer & set(header)) is log_per_layer

    report = json.loads(Path(trainer.log_dir, "compression_report.json").read_text())
    assert report["flops_reduction"] == pytest.approx(cb.compression.flops_reduction)
    assert 0.5 < report["flops_reduction"] < 1.0
    ranks = {row["name"]: row["rank"] for row in report["layers"]}
    assert ranks == {"net.conv1": RANK, "net.conv2": RANK, "net.conv3": RANK, "net.fc": None}


def test_report_without_logger_goes_to_default_root_dir(tmp_path: Path) -> None:
    trainer = make_trainer([LowRankProjectionCallback(rank_ratio=0.25)], default_root_dir=tmp_path)
    trainer.fit(Tiny())
    assert (tmp_path / "compression_report.json").is_file()


# ------------------------------------------------------------------------------- 6. resume
class Interrupt(L.Callback):
    """Stops a fit (like a crash) at the start of an epoch or before a given optimizer step."""

    def __init__(self, epoch: int | None = None, step: int | None = None) -> None:
        self.epoch, self.step = epoch, step

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyError("interrupted")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise KeyError("interrupted")


def interrupted_vs_uninterrupted(tmp_path: Path, make_callbacks, interrupt: Interrupt,
                                 make_checkpoint, max_epochs: int = 4):
    """Final weights and callbacks of one fit, and of the same fit interrupted then resumed
    from the checkpoint that ``make_checkpoint()`` saved; and that checkpoint, loaded."""
    def fit(callbacks: list, ckpt_path: str | None = None, seed: int = 0) -> Tiny:
        L.seed_everything(seed, verbose=False)
        model = Tiny()
        saving = any(isinstance(c, ModelCheckpoint) for c in callbacks)
        make_trainer(callbacks, max_epochs=max_epochs, deterministic=True,
                     enable_checkpointing=saving, default_root_dir=tmp_path
                     ).fit(model, ckpt_path=ckpt_path)
        return model

    straight_cbs = make_callbacks()
    straight = fit(straight_cbs)
    checkpoint = make_checkpoint()
    with pytest.raises(KeyError, match="interrupted"):
        fit([*make_callbacks(), interrupt, checkpoint])
    saved = checkpoint.last_model_path or checkpoint.best_model_path
    state = torch.load(saved, weights_only=False)  # before the resumed run overwrites it
    resumed_cbs = make_callbacks()
    # Another initialisation: everything must come from the checkpoint.
    resumed = fit([*resumed_cbs, make_checkpoint()], ckpt_path=saved, seed=1)
    return straight, straight_cbs, resumed, resumed_cbs, state


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("every_n_epochs", [1, 3])
def test_resume_epoch_schedule_is_exact(tmp_path: Path, every_n_epochs: int) -> None:
    def make() -> list:
        return [Recorder(rank_ratio=0.25, every_n_epochs=every_n_epochs, report=False)]

    straight, (a,), resumed, (b,), _ = interrupted_vs_uninterrupted(
        tmp_path, make, Interrupt(epoch=2),
        lambda: ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
    assert_same_weights(straight, resumed)
    assert b.num_projections == a.num_projections == (4 if every_n_epochs == 1 else 2)
    assert b.calls == a.calls[-len(b.calls):]  # the resumed run did the rest, no more
    assert conv_ranks(resumed) == dict.fromkeys(CONVS, RANK)


@pytest.mark.parametrize("stop_at", [5, 6])  # right after a projection, or one step later
def test_resume_step_schedule_mid_epoch_is_exact(tmp_path: Path, stop_at: int) -> None:
    def make() -> list:
        return [Recorder(rank_ratio=0.25, every_n_train_steps=2, report=False)]

    straight, (a,), resumed, (b,), state = interrupted_vs_uninterrupted(
        tmp_path, make, Interrupt(step=stop_at),
        lambda: ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop_at,
                                save_top_k=-1),
        max_epochs=3)
    assert state["global_step"] == stop_at and state["epoch"] == 1  # mid-epoch
    assert_same_weights(straight, resumed)
    assert a.scheduled(0) == [2, 4, 6, 8, 10, 12]
    assert b.num_projections == a.num_projections == 6
    assert [c for c in a.calls if c[0] > stop_at] == b.calls


def test_two_instances_keep_their_own_state(tmp_path: Path) -> None:
    def make() -> list:
        return [
            Recorder(rank_ratio=0.25, include="net.conv1", every_n_epochs=1, report=False),
            Recorder(rank_ratio=0.5, include=["net.conv2", "net.conv3"], every_n_train_steps=3,
                     report=False),
        ]

    straight, (a1, a2), resumed, (b1, b2), state = interrupted_vs_uninterrupted(
        tmp_path, make, Interrupt(epoch=2),
        lambda: ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
    assert b1.state_key != b2.state_key
    assert {b1.state_key, b2.state_key} <= set(state["callbacks"])
    assert state["callbacks"][b1.state_key]["num_projections"] == 2
    assert state["callbacks"][b2.state_key]["num_projections"] == 2  # steps 3 and 6 of 8
    assert_same_weights(straight, resumed)
    assert (b1.num_projections, b2.num_projections) == (a1.num_projections, a2.num_projections)
    assert (a1.num_projections, a2.num_projections) == (4, 6)  # 5 scheduled + final at 16
    assert conv_ranks(resumed) == {"net.conv1": 4, "net.conv2": 8, "net.conv3": 8}


# ---------------------------------------------------------------- 7. decompose at fit end
def test_decompose_on_fit_end_and_test_best_checkpoint(tmp_path: Path) -> None:
    model = Tiny()
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="min", save_top_k=1)
    cb = LowRankProjectionCallback(rank_ratio=0.25, decompose_on_fit_end=True, report=False)
    trainer = make_trainer([cb, best], max_epochs=3, enable_checkpointing=True)
    trainer.fit(model)

    low = dict.fromkeys(CONVS, RANK)
    assert decomposed_ranks(model) == low
    assert all(isinstance(model.get_submodule(n), FactorizedConv) for n in CONVS)
    state = torch.load(best.best_model_path, weights_only=False)
    assert state["callbacks"][cb.state_key]["ranks"] == low

    # The "best" checkpoint holds dense (projected) weights; they load into the thin layers.
    (result,) = trainer.test(model, ckpt_path="best", verbose=False)
    for n in CONVS:
        torch.testing.assert_close(model.get_submodule(n).weight.detach(),
                                   state["state_dict"][f"{n}.weight"], atol=1e-5, rtol=1e-4)
    dense = Tiny()
    dense.load_state_dict(state["state_dict"])
    (expected,) = make_trainer().test(dense, verbose=False)
    assert result["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-4)

    # A checkpoint of the decomposed model says how to rebuild the thin architecture.
    trainer.save_checkpoint(tmp_path / "compact.ckpt")
    compact = torch.load(tmp_path / "compact.ckpt", weights_only=True)
    cb_state = compact["callbacks"][cb.state_key]
    assert cb_state["ranks"] == cb_state["decomposed_ranks"] == low
    fresh = Tiny()
    decompose_(fresh, ranks=cb_state["decomposed_ranks"])
    fresh.load_state_dict(compact["state_dict"])
    x = model.x[:4]
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


# ---------------------------------------------------------------------- 8. works with ...
def test_decomposed_checkpoint_loads_into_a_fresh_dense_model(tmp_path: Path) -> None:
    model = Tiny()
    cb = LowRankProjectionCallback(rank_ratio=0.25, decompose_on_fit_end=True, report=False)
    trainer = make_trainer([cb], max_epochs=1)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "compact.ckpt")
    (expected,) = trainer.test(model, verbose=False)

    # A new dense model: the callback decomposes it to the checkpoint's thin layers before
    # the weights load (without the callback Lightning would report missing/unexpected keys).
    fresh = Tiny()
    other = LowRankProjectionCallback(rank_ratio=0.25, report=False)
    (result,) = make_trainer([other]).test(fresh, ckpt_path=tmp_path / "compact.ckpt",
                                            verbose=False)
    assert decomposed_ranks(fresh) == dict.fromkeys(CONVS, RANK)
    assert result["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-6)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision(precision: str) -> None:
    try:
        trainer = make_trainer([LowRankProjectionCallback(rank_ratio=0.25)], max_epochs=2,
                               precision=precision)
    except (MisconfigurationException, ValueError) as err:
        pytest.skip(f"precision={precision!r} is not supported on CPU here: {err}")
    if trainer.precision != precision:  # lightning 2.6 swaps CPU "16-mixed" for "bf16-mixed"
        pytest.skip(f"Lightning runs precision={precision!r} as {trainer.precision!r} on CPU "
                    "(no fp16 AMP on CPU); that case is the bf16-mixed one")
    model = Tiny()
    trainer.fit(model)
    assert model.net.conv2.weight.dtype == torch.float32
    assert conv_ranks(model) == dict.fromkeys(CONVS, RANK)


def test_bf16_true_precision() -> None:
    model = Tiny()
    before = model.net.conv2.weight.detach().clone()
    cb = LowRankProjectionCallback(rank_ratio=0.25, every_n_epochs=2)
    make_trainer([cb], max_epochs=3, precision="bf16-true").fit(model)
    w = model.net.conv2.weight
    assert w.dtype == torch.bfloat16  # written back in the parameter's own dtype
    assert torch.isfinite(w).all() and not torch.equal(w.float(), before)
    # bf16 rounding (relative 2**-8) leaves tiny singular values behind the kept four.
    assert conv_ranks(model, rtol=2e-2) == dict.fromkeys(CONVS, RANK)
    assert cb.compression is not None


@pytest.mark.slow
def test_compiled_net() -> None:
    model = Tiny(n_batches=2)
    model.net = torch.compile(model.net)
    cb = LowRankProjectionCallback(rank_ratio=0.25)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([cb], max_epochs=2).fit(model)
    assert cb.num_projections == 2
    assert conv_ranks(model) == {f"net._orig_mod.conv{i}": RANK for i in (1, 2, 3)}
    rectified = [r.bn_rectified for r in cb.last_records]
    # Either the hooks saw the data flow through the compiled net, or the user was told.
    assert rectified == [True, True, False] or any(
        "no conv feeds a BatchNorm" in str(w.message) for w in caught)
    assert cb.compression is not None  # counted on the eager module, named as the records are
    names = {c.name for c in cb.compression.layers}
    assert names == {f"net._orig_mod.{n}" for n in ("conv1", "conv2", "conv3", "fc")}
    assert {r.name for r in cb.last_records} <= names


@pytest.mark.slow
def test_compiled_lightning_module() -> None:
    model = Tiny(n_batches=2)
    cb = LowRankProjectionCallback(rank_ratio=0.25, report=False)
    make_trainer([cb], max_epochs=1).fit(torch.compile(model))
    assert cb.num_projections == 1
    assert conv_ranks(model) == dict.fromkeys(CONVS, RANK)


def test_with_checkpoint_early_stopping_and_lr_monitor(tmp_path: Path) -> None:
    model = Tiny(scheduler=True)
    cb = Recorder(rank_ratio=0.25)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True)
    stop = EarlyStopping(monitor="val_const", patience=1)  # never improves: stops at epoch 1
    trainer = make_trainer([cb, ckpt, stop, LearningRateMonitor("epoch")], max_epochs=10,
                           logger=CSVLogger(tmp_path), enable_checkpointing=True,
                           accumulate_grad_batches=2)
    trainer.fit(model)
    assert trainer.current_epoch == 2 and cb.scheduled(1) == [0, 1] and not cb.final
    assert conv_ranks(model) == dict.fromkeys(CONVS, RANK)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["callbacks"][cb.state_key]["num_projections"] == 2
    with open(os.path.join(trainer.log_dir, "metrics.csv")) as f:
        header = f.readline()
    assert "lr-SGD" in header and "lrpet/mean_kept_energy" in header


@pytest.mark.parametrize(
    "callback_args",
    [
        ["--trainer.callbacks+=lrpet_lightning.LowRankProjectionCallback",
         "--trainer.callbacks.rank_ratio=0.25", "--trainer.callbacks.every_n_train_steps=2"],
        ['--trainer.callbacks=[{"class_path": "lrpet_lightning.LowRankProjectionCallback", '
         '"init_args": {"rank_ratio": 0.25, "every_n_train_steps": 2}}]'],
    ],
    ids=["append", "class_path"],
)
def test_lightning_cli(tmp_path: Path, callback_args: list[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["train.py"])  # not pytest's arguments

    cli = LightningCLI(
        Tiny, save_config_callback=None, run=True,
        args=["fit", "--trainer.accelerator=cpu", "--trainer.max_epochs=1",
              "--trainer.logger=false", "--trainer.enable_checkpointing=false",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
              *callback_args],
    )
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, LowRankProjectionCallback)]
    assert cb.config.rank_ratio == 0.25 and cb.every_n_train_steps == 2
    assert cb.num_projections == 2  # steps 2 and 4
    assert conv_ranks(cli.model) == dict.fromkeys(CONVS, RANK)


# ------------------------------------------------------------------ 9. refused strategies
class DeepSpeedStrategy:  # stands in for lightning's, which needs deepspeed installed
    pass


def _strategies() -> list[Any]:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    class MyFSDP(FSDPStrategy):  # a subclass is refused too
        pass

    return [FSDPStrategy(), MyFSDP(), DeepSpeedStrategy(), ModelParallelStrategy()]


@pytest.mark.parametrize("index", [0, 1, 2, 3],
                         ids=["fsdp", "fsdp_subclass", "deepspeed", "model_parallel"])
def test_sharding_strategies_are_refused_in_setup(index: int) -> None:
    strategy = _strategies()[index]
    trainer = types.SimpleNamespace(strategy=strategy)
    cb = LowRankProjectionCallback(rank_ratio=0.25)
    with pytest.raises(MisconfigurationException, match="does not support the .* strategy"):
        cb.setup(trainer, Tiny(), "fit")  # type: ignore[arg-type]
    cb.setup(trainer, Tiny(), "test")  # nothing to project outside fit


# --------------------------------------------------------------------- 10. bad arguments
# A wrong type raises TypeError, a value out of range ValueError.
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank_ratio": 0}, ValueError, "rank_ratio must be a number in"),
        ({"rank_ratio": 1.5}, ValueError, "rank_ratio must be a number in"),
        ({"rank_ratio": "a"}, TypeError, "rank_ratio must be a number in"),
        ({"rank_ratio": None}, ValueError, "give rank_ratio"),
        ({"every_n_epochs": 2, "every_n_train_steps": 3}, ValueError, "choose one schedule"),
        ({"every_n_train_steps": 0}, ValueError, "every_n_train_steps must be an int >= 1"),
        ({"every_n_epochs": 0}, ValueError, "every_n_epochs must be an int >= 1"),
        ({"every_n_epochs": "2"}, TypeError, "every_n_epochs must be an int >= 1"),
        ({"every_n_epochs": 1.5}, TypeError, "every_n_epochs must be an int >= 1"),
        ({"every_n_train_steps": True}, TypeError, "every_n_train_steps must be an int >= 1"),
        ({"start": -1}, ValueError, "start must be an int >= 0"),
        ({"start": None}, TypeError, "start must be an int >= 0"),
        ({"start": 3, "stop": 3}, ValueError, "stop must be greater than start=3"),
        ({"start": 3, "stop": 1}, ValueError, "stop must be greater than start=3"),
        ({"stop": 0}, ValueError, "stop must be an int >= 1"),
        ({"budget_warmup_epochs": -1}, ValueError, "budget_warmup_epochs must be an int >= 0"),
        ({"budget_warmup_epochs": "1"}, TypeError, "budget_warmup_epochs must be an int >= 0"),
        ({"final_projection": 1}, TypeError, "final_projection must be True or False"),
        ({"final_projection": "yes"}, TypeError, "final_projection must be True or False"),
        ({"decompose_on_fit_end": "yes"}, TypeError, "decompose_on_fit_end must be True or False"),
        ({"log_per_layer": None}, TypeError, "log_per_layer must be True or False"),
        ({"report": 0}, TypeError, "report must be True or False"),
        ({"energy_transfer": 1}, TypeError, "energy_transfer must be True or False"),
        ({"residual_scale": 2.0}, ValueError, "residual_scale must be a number in"),
        ({"svd_method": "qr"}, ValueError, "svd_method must be one of"),
        ({"ranks": [0.5]}, TypeError, "ranks must be a mapping"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    kwargs = {"rank_ratio": 0.25, **kwargs}
    with pytest.raises(error, match=match) as caught:
        LowRankProjectionCallback(**kwargs)
    assert type(caught.value) is error


def test_pattern_matching_nothing_fails_at_the_first_step() -> None:
    cb = LowRankProjectionCallback(rank_ratio=0.25, include="net.nothing*")
    with pytest.raises(ValueError, match="include pattern 'net.nothing\\*' matches no"):
        make_trainer([cb]).fit(Tiny())


# ----------------------------------------------------------------------------- example
@pytest.mark.slow  # a fresh interpreter running examples/add_callback.py: ~10 s
def test_add_callback_example_runs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # see above
    out = subprocess.run([sys.executable, str(REPO / "examples" / "add_callback.py")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "LRPET compression report" in text and "% fewer" in text
    accuracy = float(re.search(r"compact model test accuracy: ([0-9.]+)", text).group(1))
    assert accuracy > 0.8, text[-2000:]
    assert (tmp_path / "outputs" / "add_callback" / "compression_report.json").is_file()


# ------------------------------------------------------------------ DDP simulated on CPU
class SameOnEveryRank(L.Callback):
    """Fails the fit when the ranks' weights differ after the final projection."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "the replicas drifted apart"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_spawn_on_cpu(tmp_path: Path) -> None:
    # Every rank must reach the same collectives (trainer.log_dir broadcasts) or fit end hangs.
    from torch.multiprocessing.spawn import ProcessExitedException

    for attempt in range(2):
        model, logs = Tiny(), tmp_path / str(attempt)
        callbacks = [LowRankProjectionCallback(rank_ratio=0.25, every_n_epochs=2),
                     SameOnEveryRank()]
        trainer = make_trainer(callbacks, max_epochs=3, strategy="ddp_spawn", devices=2,
                               logger=CSVLogger(logs))
        try:
            trainer.fit(model)
            break
        except ProcessExitedException as err:
            # Seen once in CI on a loaded 2-core machine: a worker that had finished the fit
            # (report written) aborted in gloo's teardown at interpreter exit ("terminate
            # called without an active exception"). Once is torch's race; twice fails here.
            if err.signal_name != "SIGABRT" or attempt:
                raise
    assert conv_ranks(model) == dict.fromkeys(CONVS, RANK)  # weights come back from rank 0
    assert len(list(logs.rglob("compression_report.json"))) == 1


# ------------------------------------------------------------- public read-only state
def test_ranks_and_records_properties_are_the_checkpointed_ranks_and_last_records() -> None:
    cb = LowRankProjectionCallback(rank_ratio=0.25, report=False)
    assert cb.ranks == {} and cb.records == []  # before any fit
    make_trainer([cb], max_epochs=2).fit(Tiny())
    assert cb.ranks == cb.state_dict()["ranks"] == dict.fromkeys(CONVS, RANK)
    assert cb.records == cb.last_records and [r.name for r in cb.records] == list(CONVS)
    cb.ranks["net.conv1"] = 1  # a copy: the callback's own ranks are not changed
    assert cb.state_dict()["ranks"]["net.conv1"] == RANK
    for name in ("ranks", "records", "first_records", "budget_solution"):
        with pytest.raises(AttributeError):
            setattr(cb, name, None)


def test_decomposed_ranks_are_in_state_dict_and_old_checkpoints_still_load(
        tmp_path: Path) -> None:
    model = Tiny()
    cb = LowRankProjectionCallback(rank_ratio=0.25, decompose_on_fit_end=True, report=False)
    assert cb.state_dict()["decomposed_ranks"] == {}
    trainer = make_trainer([cb], max_epochs=1)
    trainer.fit(model)
    assert cb.state_dict()["decomposed_ranks"] == dict.fromkeys(CONVS, RANK)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    state = checkpoint["callbacks"][cb.state_key]
    assert state == cb.state_dict()  # on_save_checkpoint adds nothing to it any more
    # A checkpoint without the key (older) and one with it: both restore the counters.
    for saved in ({k: v for k, v in state.items() if k != "decomposed_ranks"}, state):
        other = LowRankProjectionCallback(rank_ratio=0.25, report=False)
        other.load_state_dict(dict(saved))
        assert other.num_projections == 1 and other.ranks == dict.fromkeys(CONVS, RANK)
    # The relaunch of that old checkpoint, with the same command, still loads and finishes.
    del state["decomposed_ranks"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    again = LowRankProjectionCallback(rank_ratio=0.25, decompose_on_fit_end=True, report=False)
    fresh = Tiny()
    make_trainer([again], max_epochs=1).fit(fresh, ckpt_path=tmp_path / "old.ckpt")
    assert decomposed_ranks(fresh) == dict.fromkeys(CONVS, RANK)
    assert again.num_projections == 1
