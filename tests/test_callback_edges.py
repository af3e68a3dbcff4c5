"""Callback edge cases: overlapping callbacks, several optimizer steps per batch, a failed
layer at the last scheduled projection, a relaunch of a decomposed model, and layers whose
weight the parent reads or that do not run in the first step."""
from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrpet_lightning import FactorizedConv, decomposed_ranks
from lrpet_lightning.callback import LowRankProjectionCallback
from lrpet_lightning.core import transforms


class Net(nn.Module):
    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.late, self.late_bn = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)
        self.branch, self.calls = branch, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        if not self.branch or self.calls > 1:  # a branch first taken in the second step
            x = self.late_bn(self.late(x))
        return self.fc(x.mean((2, 3)))


class Tiny(L.LightningModule):
    def __init__(self, two_optimizers: bool = False, branch: bool = False) -> None:
        super().__init__()
        self.net = Net(branch)
        self.two_optimizers = two_optimizers
        if two_optimizers:
            self.automatic_optimization = False
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(24, 3, 8, 8, generator=g),
                                  torch.randint(0, 4, (24,), generator=g))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.two_optimizers:  # two optimizer steps per batch: global_step += 2
            for opt in self.optimizers():
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in self.optimizers():
                opt.step()
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> Any:
        if not self.two_optimizers:
            return torch.optim.SGD(self.parameters(), lr=0.05)
        head = list(self.net.fc.parameters())
        body = [p for p in self.parameters() if all(p is not h for h in head)]
        return [torch.optim.SGD(body, lr=0.05), torch.optim.SGD(head, lr=0.05)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


def trainer(callbacks: list, **kwargs: Any) -> L.Trainer:
    kwargs = {"max_epochs": 1, "logger": False, "enable_checkpointing": False,
              "num_sanity_val_steps": 0, **kwargs}
    return L.Trainer(accelerator="cpu", devices=1, callbacks=callbacks,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_two_callbacks_on_the_same_layers_are_refused_before_training() -> None:
    a = LowRankProjectionCallback(rank_ratio=0.25, report=False)
    b = LowRankProjectionCallback(rank_ratio=0.5, report=False)
    model = Tiny()
    with pytest.raises(MisconfigurationException, match="target the same layers"):
        trainer([a, b]).fit(model)
    assert model.net.calls == 0


def test_step_schedule_fires_when_several_steps_cross_a_multiple() -> None:
    fired = []

    class Counting(LowRankProjectionCallback):
        def _project(self, trainer, pl_module, config=None, final=False):
            fired.append((trainer.global_step, final))
            super()._project(trainer, pl_module, config=config, final=final)

    cb = Counting(rank_ratio=0.25, every_n_train_steps=3, report=False)
    trainer([cb]).fit(Tiny(two_optimizers=True))  # 6 batches: global_step 2, 4, ..., 12
    assert [s for s, final in fired if not final] == [4, 6, 10, 12]


def test_a_failed_layer_at_the_last_scheduled_projection_does_not_skip_the_final_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = transforms._project_with_fallbacks, []

    def flaky(M, rank, scale, config):
        calls.append(1)
        if len(calls) == 3:  # a transient failure of the epoch-end projection's last layer
            raise RuntimeError("transient")
        return real(M, rank, scale, config)

    monkeypatch.setattr(transforms, "_project_with_fallbacks", flaky)
    model = Tiny()
    cb = LowRankProjectionCallback(rank_ratio=0.25, report=False)
    with pytest.warns(RuntimeWarning, match="failed and is skipped"):
        trainer([cb]).fit(model)
    assert cb.num_projections == 2  # the scheduled one and the final one
    w = model.net.late.weight.detach().flatten(1)
    assert int(torch.linalg.matrix_rank(w, rtol=1e-5)) == 4


def test_relaunch_of_a_decomposed_run_neither_crashes_nor_projects(tmp_path) -> None:
    model = Tiny()
    cb = LowRankProjectionCallback(rank_ratio=0.25, decompose_on_fit_end=True, report=False)
    first = trainer([cb])
    first.fit(model)
    assert isinstance(model.net.conv2, FactorizedConv)
    path = tmp_path / "after.ckpt"
    first.save_checkpoint(path)  # as ModelCheckpoint's on_train_end does after the callback

    again = LowRankProjectionCallback(rank_ratio=0.25, decompose_on_fit_end=True, report=False)
    fresh = Tiny()
    trainer([again]).fit(fresh, ckpt_path=path)  # the same command: a finished run
    assert decomposed_ranks(fresh.net) == decomposed_ranks(model.net)
    assert again.num_projections == 1  # restored, none added
    trainer([again]).test(fresh, verbose=False)
    # Trained on as thin layers for two more epochs: nothing is projected, nothing counted.
    more = LowRankProjectionCallback(rank_ratio=0.25, decompose_on_fit_end=True, report=False)
    trainer([more], max_epochs=3).fit(fresh, ckpt_path=path)
    assert more.num_projections == 1 and more.last_projected_epoch == 0


class ReadsConv(nn.Module):
    """Reads conv2's weight in a functional call, as Swin reads qkv.weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.conv2d(x, self.conv2.weight, self.conv2.bias, padding=1)
        return self.fc(x.mean((2, 3)))


def test_layers_read_by_their_parent_and_late_branches_are_named() -> None:
    model = Tiny(branch=True)
    model.net = ReadsConv()
    cb = LowRankProjectionCallback(rank_ratio=0.25, decompose_on_fit_end=True, report=False)
    with pytest.warns(UserWarning, match="net.conv2: its .weight is read outside its own forward"):
        trainer([cb]).fit(model)
    assert set(cb.state_dict()["ranks"]) == {"net.conv1"}
    assert type(model.net.conv2) is nn.Conv2d and isinstance(model.net.conv1, FactorizedConv)

    late = Tiny(branch=True)
    cb = LowRankProjectionCallback(rank_ratio=0.25, report=False)
    with pytest.warns(UserWarning, match="net.late: did not run in the first training step"):
        trainer([cb]).fit(late)


class PenalizesWeights(Tiny):
    """A training step that reads every conv's .weight outside any forward (a weight
    penalty, logging its norm): harmless, so every conv is still compressed."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        penalty = sum(getattr(self.net, n).weight.square().sum() for n in ("conv1", "conv2"))
        self.log("late_norm", self.net.late.weight.norm())
        return super().training_step(batch, batch_idx) + 1e-4 * penalty


def test_weights_read_in_the_training_step_outside_any_forward_are_still_compressed() -> None:
    model = PenalizesWeights()
    cb = LowRankProjectionCallback(rank_ratio=0.25, decompose_on_fit_end=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([cb]).fit(model)
    assert not [w for w in caught if "read outside" in str(w.message)]
    assert set(decomposed_ranks(model.net)) == {"conv1", "conv2", "late"}
    assert cb.compression is not None and cb.compression.flops_reduction > 0.3


# --------------------------------------- the core helpers behind the callback, plain PyTorch
def test_input_recorder_keeps_one_sample_of_the_first_call_and_unhooks() -> None:
    from lrpet_lightning.core.trace import InputRecorder, run_forward

    net = Net()
    with InputRecorder(net) as recorder:
        net(torch.randn(8, 3, 8, 8))
        net(torch.randn(2, 3, 8, 8))
        assert not net._forward_pre_hooks  # gone after the first call
    (x,) = recorder.inputs
    assert x.shape == (1, 3, 8, 8) and not x.requires_grad
    assert run_forward(net, recorder.inputs).shape == (1, 4)

    class Both(nn.Module):
        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return x * scale

    both = Both()
    with InputRecorder(both) as recorder:
        both(torch.ones(3, 2), scale=torch.ones(3, 2))
    assert recorder.inputs is None and "positional and keyword" in recorder.problem


def test_find_network_names_and_compiled_children() -> None:
    from lrpet_lightning.core.network import find_network

    model = Tiny()
    network = find_network(model, ["net.conv1", "net.conv2"])
    assert network.called is model.net is network.eager and network.prefix == "net"
    assert network.local({"net.conv1": 4}) == {"conv1": 4}
    assert network.qualified({"conv1": 4, "": 1}) == {"net.conv1": 4, "net": 1}
    assert [x.name for x in network.local_layers([_layer(model.net.conv1, "net.conv1")])
            ] == ["conv1"]
    with pytest.raises(ValueError, match="not inside the network"):
        network.local_name("head.fc")
    # Layers under two children, or a wrapper around one bare layer: the root itself.
    assert find_network(model, ["net.conv1", "other.fc"]).prefix == ""
    bare = nn.Module()
    bare.conv = nn.Conv2d(3, 4, 3)
    assert find_network(bare, ["conv"]).eager is bare
    compiled = Tiny()
    compiled.net = torch.compile(compiled.net)
    network = find_network(compiled, ["net._orig_mod.conv1"])
    assert network.called is compiled.net and network.eager is compiled.net._orig_mod
    assert network.prefix == "net._orig_mod"


def _layer(module: nn.Module, name: str):
    from lrpet_lightning.core.walk import TargetLayer

    return TargetLayer(name=name, module=module, rank=4, full_rank=16)


def test_merge_trace_returns_only_what_the_trace_added_and_set_ranks_checks_names() -> None:
    from lrpet_lightning.core.config import LowRankConfig
    from lrpet_lightning.core.plan import merge_trace, select_plan, set_ranks
    from lrpet_lightning.core.trace import BNPairTracer

    model = Tiny(branch=True)
    model.net = ReadsConv()
    plan = select_plan(model, LowRankConfig(rank_ratio=0.25))
    plan.skipped["earlier"] = "left alone at selection"
    with BNPairTracer(model, plan.layers) as tracer:
        model.net(torch.randn(1, 3, 8, 8))
    new = merge_trace(plan, tracer.trace(), bn_rectification=True, not_run_note="did not run")
    assert list(new.skipped) == ["net.conv2"] and new.notes == {}
    assert set(plan.skipped) == {"earlier", "net.conv2"}
    assert [x.name for x in plan.layers] == [x.name for x in new.layers] == ["net.conv1"]
    set_ranks(plan.layers, {"net.conv1": 2})
    assert plan.ranks == {"net.conv1": 2}
    with pytest.raises(ValueError, match="restored ranks name other layers"):
        set_ranks(plan.layers, {"net.conv9": 2}, "restored ranks")


class ReluFirst(Net):
    """Every BatchNorm follows a ReLU: no conv feeds one directly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(F.relu(self.conv1(x)))
        x = self.late_bn(F.relu(self.late(F.relu(self.conv2(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("bn_rectification", [True, False])
def test_no_bn_pair_warning_only_while_bn_rectification_is_asked_for(
        bn_rectification: bool) -> None:
    model = Tiny()
    model.net = ReluFirst()
    cb = LowRankProjectionCallback(rank_ratio=0.25, bn_rectification=bn_rectification,
                                   report=False)
    with pytest.warns() if bn_rectification else warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        trainer([cb]).fit(model)
    said = [str(w.message) for w in got]
    # The layers ran (hooks saw them): the reason is the model's data flow, not compiling.
    why = "no projected conv feeds a BatchNorm directly in the first training step (each " \
          "BatchNorm follows another op or a layer left alone)"
    assert any(why in m for m in said) == bn_rectification, said
    assert not any("compiled" in m for m in said)
    assert cb.num_projections == 1


def test_a_fit_of_a_partly_decomposed_model_reports_against_the_dense_one() -> None:
    """Continuing a run whose checkpoint holds some thin layers: the callback plans the
    others, and its report counts the thin ones as compressed (it said 0 % before)."""
    from lrpet_lightning import decompose_

    whole = LowRankProjectionCallback(rank_ratio=0.25)
    trainer([whole]).fit(Tiny())
    model = Tiny()
    decompose_(model.net, ranks={"conv2": 4})
    partly = LowRankProjectionCallback(rank_ratio=0.25)
    trainer([partly]).fit(model)
    assert set(partly.ranks) == {"net.conv1", "net.late"}
    assert partly.compression.flops_reduction == whole.compression.flops_reduction > 0.5
    assert partly.compression.params_reduction == whole.compression.params_reduction


def test_a_relaunch_with_other_settings_says_so_and_counts_on(tmp_path) -> None:
    first = trainer([LowRankProjectionCallback(rank_ratio=0.25, report=False)],
                    max_epochs=2)
    first.fit(Tiny())
    path = tmp_path / "run.ckpt"
    first.save_checkpoint(path)
    changed = LowRankProjectionCallback(rank_ratio=0.5, report=False)
    with pytest.warns(UserWarning, match=r"saved with other settings \(LowRankProjection"
                                         r"Callback\{'rank_ratio': 0.25.*the projection "
                                         r"count goes on from 2"):
        trainer([changed], max_epochs=3).fit(Tiny(), ckpt_path=path)
    assert changed.num_projections == 3 and changed.last_projected_epoch == 2
    assert changed.ranks == dict.fromkeys(["net.conv1", "net.conv2", "net.late"], 8)
    same = LowRankProjectionCallback(rank_ratio=0.25, report=False)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        trainer([same], max_epochs=3).fit(Tiny(), ckpt_path=path)
    assert not any("other settings" in str(w.message) for w in got)
    assert same.num_projections == 3


def test_first_sample_keeps_namedtuples() -> None:
    # A namedtuple batch passed to the network: the input recorder's hook must not break it.
    from collections import namedtuple

    from lrpet_lightning.core.trace import first_sample

    Pair = namedtuple("Pair", "image mask")
    sample = first_sample(((Pair(torch.zeros(5, 3), torch.ones(5, 1)),), {}))
    (pair,), kwargs = sample
    assert isinstance(pair, Pair) and pair.image.shape == (1, 3) and pair.mask.shape == (1, 1)
    assert kwargs == {}
