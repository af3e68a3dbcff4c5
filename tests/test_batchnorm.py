"""recalibrate_batchnorms_ and the app's bn_recalibration: BatchNorm statistics recomputed
for the final weights (the last projection leaves them describing the weights before it)."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from helpers import compose
from torch import nn

from lrpet_lightning import project_low_rank_, recalibrate_batchnorms_
from lrpet_lightning.app.train import train


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout(0.5), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4, momentum=0.3))


def test_statistics_are_the_average_over_the_batches_of_the_final_weights() -> None:
    net = _net()
    batches = [torch.randn(6, 3, 9, 9) for _ in range(4)]
    project_low_rank_(net, rank_ratio=0.5, bn_rectification=False)  # statistics untouched
    used = recalibrate_batchnorms_(net, iter(batches), max_batches=3)
    assert used == 3
    # What the first BatchNorm sees: the conv's output (dropout off: everything but the
    # BatchNorms is in eval mode). momentum=None averages the per-batch statistics.
    feats = [net[0](x) for x in batches[:3]]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(1) for f in feats]).mean(0)
    torch.testing.assert_close(net[2].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[2].running_var, var, rtol=1e-5, atol=1e-6)
    assert int(net[2].num_batches_tracked) == 3


def test_modes_momentum_and_weights_are_restored() -> None:
    net = _net().train()
    net[1].eval()  # a mixed state must come back as it was
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    recalibrate_batchnorms_(net, [torch.randn(2, 3, 9, 9)], max_batches=5)
    assert [m.training for m in net] == [True, False, True, True, True, True]
    assert net[2].momentum == 0.1 and net[5].momentum == 0.3
    for key, value in weights.items():
        assert torch.equal(net.state_dict()[key], value), key


def test_no_batches_keeps_the_old_statistics_and_no_batchnorm_returns_zero() -> None:
    net = _net()
    net(torch.randn(4, 3, 9, 9))
    before = net[2].running_mean.clone(), int(net[2].num_batches_tracked)
    assert recalibrate_batchnorms_(net, [], max_batches=2) == 0
    assert torch.equal(net[2].running_mean, before[0])
    assert int(net[2].num_batches_tracked) == before[1]
    assert recalibrate_batchnorms_(nn.Linear(3, 2), [torch.randn(2, 3)], 1) == 0


def test_a_failing_forward_restores_the_statistics_and_names_the_inputs() -> None:
    net = _net()
    net(torch.randn(4, 3, 9, 9))
    before = net[2].running_var.clone()
    with pytest.raises(ValueError, match=r"example_inputs of shape \(2, 5, 9, 9\)"):
        recalibrate_batchnorms_(net, [torch.randn(2, 5, 9, 9)], 1)
    assert torch.equal(net[2].running_var, before) and net[2].momentum == 0.1


@pytest.mark.parametrize("bad, error", [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_max_batches_is_checked(bad, error) -> None:
    with pytest.raises(error, match="max_batches must be an int >= 1"):
        recalibrate_batchnorms_(_net(), [torch.randn(2, 3, 9, 9)], bad)


def test_app_recomputes_the_statistics_before_scoring_and_saving(tmp_path) -> None:
    from helpers import TINY_RUN

    cfg = compose(f"output_dir={tmp_path}", *TINY_RUN, "bn_recalibration=3")
    results = train(cfg)
    assert results["status"] == "finished" and results["bn_recalibration_batches"] == 3
    assert json.loads((tmp_path / "results.json").read_text())["bn_recalibration_batches"] == 3
    compact = torch.load(tmp_path / "compact_model.pt", weights_only=False)
    tracked = {k: int(v) for k, v in compact["state_dict"].items()
               if k.endswith("num_batches_tracked")}
    assert tracked and set(tracked.values()) == {3}, tracked  # the saved model's statistics


def test_app_off_by_default_and_a_bad_value_is_refused_before_training(cfg_tiny,
                                                                       tmp_path) -> None:
    assert cfg_tiny.bn_recalibration == 0
    bad = compose(f"output_dir={tmp_path / 'bad'}", "bn_recalibration=-1")
    with pytest.raises(ValueError, match=r"bn_recalibration must be an int >= 0.*got -1"):
        train(bad)
    assert not (tmp_path / "bad" / "results.json").exists()


def test_app_recalibration_depends_on_the_seed_alone_and_keeps_the_random_state() -> None:
    from lrpet_lightning.app.data import DigitsDataModule
    from lrpet_lightning.app.train import recalibrate_bn
    from lrpet_lightning.models import build_model

    data = DigitsDataModule(batch_size=32, image_size=16, augment=True)  # random shifts
    torch.manual_seed(0)
    dense = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    stats = []
    for draw in range(2):
        net = copy.deepcopy(dense)
        torch.manual_seed(draw)  # a different random state before each call
        state = torch.get_rng_state()
        assert recalibrate_bn(net, data, batches=2, seed=5) == 2
        assert torch.equal(torch.get_rng_state(), state)
        stats.append(net.bn1.running_var.clone())
    torch.testing.assert_close(stats[0], stats[1], rtol=0, atol=0)


def test_recent_inputs_keeps_the_last_training_calls_only() -> None:
    from lrpet_lightning.core.batchnorm import RecentInputs

    net = _net()
    batches = [torch.randn(2, 3, 9, 9) for _ in range(4)]
    with RecentInputs(net, 2) as recent:
        for x in batches:
            net(x)
        net.eval()(torch.randn(2, 3, 9, 9))  # validation: not kept
        net.train()
        kept = [args[0] for args, _ in recent._kept]
        assert len(recent) == 2 and kept[0] is not batches[2]  # detached views, not copies
        assert all(torch.equal(k, b) for k, b in zip(kept, batches[2:], strict=True))
        assert recent.recalibrate(net) == 2 and len(recent) == 2  # its own calls not kept
    assert len(recent) == 0 and not net._forward_pre_hooks  # unhooked, emptied


def _bn_input_stats(module, batches):
    """The mean and variance the first BatchNorm of ``module.net`` sees over ``batches``."""
    with torch.no_grad():
        feats = [module.net.conv1(x) for x in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(1) for f in feats]).mean(0)
    return mean, var


@pytest.mark.parametrize(("schedule", "tracked"), [
    ({"every_n_epochs": 1}, [2, 2]),  # projected on the epoch's last batch
    ({"every_n_train_steps": 3}, [3, 4]),  # at steps 3 and 6: then 1 and 2 more batches
])
def test_callback_recalibrates_after_every_projection(schedule, tracked) -> None:
    from helpers import Tiny, make_trainer

    from lrpet_lightning import LowRankProjectionCallback

    module = Tiny(n_batches=4)
    seen: list[tuple[int, int]] = []  # (projections done, num_batches_tracked) at validation
    lrpet = LowRankProjectionCallback(rank_ratio=0.25, bn_recalibration=2, **schedule)

    class Spy(L.Callback):
        def on_validation_start(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                seen.append((lrpet.num_projections, int(pl_module.net.bn1.num_batches_tracked)))

    trainer = make_trainer([lrpet, Spy()], max_epochs=2)
    trainer.fit(module)
    # Statistics restart from the 2 kept batches at each projection (momentum=None while
    # recomputed, then training's own momentum again for the batches after it).
    assert [n for n, _ in seen] == [1, 2] and [t for _, t in seen] == tracked, seen
    # After fit (the final projection's recalibration, or the last scheduled one): the
    # statistics of the last two training batches, run through the final weights.
    mean, var = _bn_input_stats(module, [module.x[8:12], module.x[12:16]])
    torch.testing.assert_close(module.net.bn1.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(module.net.bn1.running_var, var, rtol=1e-4, atol=1e-5)


def test_callback_bn_recalibration_is_checked_and_off_by_default() -> None:
    from lrpet_lightning import LowRankProjectionCallback

    assert LowRankProjectionCallback(rank_ratio=0.5).bn_recalibration == 0
    with pytest.raises(ValueError, match=r"bn_recalibration must be an int >= 0.*got -2"):
        LowRankProjectionCallback(rank_ratio=0.5, bn_recalibration=-2)


def test_callback_says_when_it_recalibrates_on_fewer_batches(caplog) -> None:
    """Fewer batches than asked are kept: in a short first epoch, or right after a resume
    (the kept batches are not checkpointed)."""
    import logging

    from helpers import Tiny, make_trainer

    from lrpet_lightning import LowRankProjectionCallback

    lrpet = LowRankProjectionCallback(rank_ratio=0.25, bn_recalibration=5, report=False)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        make_trainer([lrpet], max_epochs=2).fit(Tiny(n_batches=2))
    said = [r.getMessage() for r in caplog.records if "bn_recalibration used" in r.getMessage()]
    assert said == [f"LRPET: bn_recalibration used the {n} training batch(es) seen since this "
                    "fit started, not 5" for n in (2, 4)], said  # one per projection


def test_a_failing_callback_recalibration_warns_and_training_goes_on(monkeypatch) -> None:
    from helpers import Tiny, make_trainer

    from lrpet_lightning import LowRankProjectionCallback
    from lrpet_lightning.core.batchnorm import RecentInputs

    def fail(self, model=None):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(RecentInputs, "recalibrate", fail)
    lrpet = LowRankProjectionCallback(rank_ratio=0.25, bn_recalibration=2)
    trainer = make_trainer([lrpet], max_epochs=2)
    with pytest.warns(UserWarning, match="bn_recalibration failed .RuntimeError: out of memory"):
        trainer.fit(Tiny())
    assert trainer.current_epoch == 2 and lrpet.num_projections == 2


def test_a_failure_after_some_batches_restores_every_statistic() -> None:
    net = _net()
    net(torch.randn(4, 3, 9, 9))
    before = (net[2].running_mean.clone(), int(net[2].num_batches_tracked))
    with pytest.raises(ValueError, match="do not run through"):
        recalibrate_batchnorms_(net, [torch.randn(2, 3, 9, 9), torch.randn(2, 5, 9, 9)], 2)
    assert torch.equal(net[2].running_mean, before[0])
    assert int(net[2].num_batches_tracked) == before[1]


class _Branchy(nn.Module):
    """A BatchNorm on a branch the inputs do not take (an auxiliary head), and an
    InstanceNorm that keeps running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.inorm = nn.InstanceNorm2d(4, track_running_stats=True)
        self.aux = nn.BatchNorm2d(4)
        self.use_aux = False

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.inorm(self.aux(y) if self.use_aux else y)


def test_unreached_batchnorms_and_instance_norms_keep_their_statistics() -> None:
    net = _Branchy()
    with torch.no_grad():
        net.aux.running_mean.fill_(3.0)
        net.inorm.running_mean.fill_(2.0)  # momentum=None would freeze an InstanceNorm
    assert recalibrate_batchnorms_(net, [torch.randn(2, 3, 8, 8)], 1) == 1
    assert int(net.bn.num_batches_tracked) == 1
    assert torch.equal(net.aux.running_mean, torch.full((4,), 3.0))  # not reset to 0
    assert torch.equal(net.inorm.running_mean, torch.full((4,), 2.0))


def test_mixed_positional_and_keyword_calls_are_replayed_as_made() -> None:
    from lrpet_lightning.core.batchnorm import RecentInputs

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x, scale=1.0):
            return self.bn(x * scale)

    net = Scaled()
    batches = [torch.randn(8, 3) for _ in range(2)]
    with RecentInputs(net, 2) as recent:
        for x in batches:
            net(x, scale=2.0)
        assert recent.recalibrate() == 2
    mean = torch.stack([(2.0 * x).mean(0) for x in batches]).mean(0)
    torch.testing.assert_close(net.bn.running_mean, mean)


def test_app_recalibration_feeds_a_bf16_model_bf16_inputs(tmp_path) -> None:
    from helpers import TINY_RUN

    results = train(compose(f"output_dir={tmp_path}", *TINY_RUN, "bn_recalibration=2",
                            "trainer.precision=bf16-true"))
    assert results["bn_recalibration_batches"] == 2 and results["errors"] == []


def test_callback_names_norms_outside_the_replayed_network_and_leaves_them() -> None:
    from helpers import Tiny, make_trainer

    from lrpet_lightning import LowRankProjectionCallback

    class WithHead(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.head_bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.head_bn(self.net(x))

    module = WithHead()
    lrpet = LowRankProjectionCallback(rank_ratio=0.25, bn_recalibration=2)
    with pytest.warns(UserWarning, match="norms outside it keep the statistics.*head_bn"):
        make_trainer([lrpet], max_epochs=1).fit(module)
    assert int(module.net.bn1.num_batches_tracked) == 2  # the network's: recomputed
    assert int(module.head_bn.num_batches_tracked) == 4  # the head's: training's own


def test_callback_under_ddp_takes_rank_zeros_statistics() -> None:
    from types import SimpleNamespace

    from helpers import Tiny

    from lrpet_lightning import LowRankProjectionCallback
    from lrpet_lightning.core.batchnorm import RecentInputs, norm_statistics

    module = Tiny()
    rank0 = Tiny()
    with torch.no_grad():
        rank0.net.bn1.running_mean.fill_(7.0)
    lrpet = LowRankProjectionCallback(rank_ratio=0.25, bn_recalibration=1)
    lrpet._fit.recent = RecentInputs(module.net, 1).__enter__()
    module.net(module.x[:4])
    sent = []

    def broadcast(obj, src):
        sent.append(src)
        return norm_statistics(rank0)

    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(broadcast=broadcast))
    lrpet._recalibrate(trainer, module)
    lrpet._fit.remove_hooks()
    assert sent == [0] and torch.equal(module.net.bn1.running_mean, torch.full((16,), 7.0))
