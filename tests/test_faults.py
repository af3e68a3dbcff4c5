"""Numerical faults: a failing solver falls back, a broken layer is skipped, nothing is lost."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrpet_lightning import project_low_rank_
from lrpet_lightning.core import linalg


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
    )


def _rank(weight: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(weight.detach().flatten(1), rtol=1e-5))


X = torch.randn(2, 3, 8, 8)


def test_gram_solver_failure_falls_back_to_a_full_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_eigh(*args, **kwargs):
        raise torch.linalg.LinAlgError("eigh: the algorithm failed to converge")

    monkeypatch.setattr(linalg.torch.linalg, "eigh", broken_eigh)
    model = _net()
    records = project_low_rank_(model, rank_ratio=0.25, example_inputs=X)
    assert [r.skipped for r in records] == [None, None]
    assert _rank(model[3].weight) == 4


def test_a_layer_whose_every_solver_fails_is_skipped_and_the_rest_projected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _net()
    before = model[0].weight.detach().clone()
    real = linalg.top_singular_triplets

    def fails_for_the_first_layer(M, r, method="gram", **kwargs):
        if M.shape == (16, 27):  # the first conv's matrix
            raise torch.linalg.LinAlgError("no convergence")
        return real(M, r, method, **kwargs)

    monkeypatch.setattr(linalg, "top_singular_triplets", fails_for_the_first_layer)
    with pytest.warns(RuntimeWarning, match="0.*failed and is skipped"):
        records = project_low_rank_(model, rank_ratio=0.25, example_inputs=X)
    assert records[0].skipped.startswith("SVD failed")
    assert torch.equal(model[0].weight.detach(), before)  # left exactly as it was
    assert records[1].skipped is None and _rank(model[3].weight) == 4


def test_nan_layer_is_skipped_with_a_warning_and_the_rest_projected() -> None:
    model = _net()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        records = project_low_rank_(model, rank_ratio=0.25, example_inputs=X)
    assert records[0].skipped == "non-finite values"
    assert records[1].skipped is None and _rank(model[3].weight) == 4


def test_batchnorm_with_zero_gamma_stays_finite() -> None:
    model = _net()
    with torch.no_grad():
        model[4].weight[:8] = 0.0  # half the channels switched off by BN
        model[4].running_var.fill_(1e-12)
    records = project_low_rank_(model, rank_ratio=0.25, example_inputs=X)
    assert records[1].bn_rectified and records[1].skipped is None
    assert torch.isfinite(model[3].weight).all()
    assert _rank(model[3].weight) <= 4


def test_all_zero_layer_is_skipped_not_broken() -> None:
    model = _net()
    with torch.no_grad():
        model[3].weight.zero_()
    records = project_low_rank_(model, rank_ratio=0.25, example_inputs=X)
    assert records[1].skipped == "all-zero layer"
    assert not model[3].weight.any()


def test_training_goes_on_when_a_layer_turns_nan() -> None:
    import lightning as L
    from helpers import Tiny, make_trainer

    from lrpet_lightning import LowRankProjectionCallback

    class Poison(L.Callback):
        """Corrupt one conv right before the second epoch's projection."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and trainer.is_last_batch:
                with torch.no_grad():
                    pl_module.net.conv1.weight[0, 0, 0, 0] = float("inf")

    lrpet = LowRankProjectionCallback(rank_ratio=0.25, report=False)
    trainer = make_trainer([Poison(), lrpet], max_epochs=3, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match="conv1 has NaN/Inf"):
        trainer.fit(Tiny())
    assert trainer.current_epoch == 3 and lrpet.num_projections >= 3
    skipped = {r.name: r.skipped for r in lrpet.last_records}
    assert skipped["net.conv1"] == "non-finite values"
