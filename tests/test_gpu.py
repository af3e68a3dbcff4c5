"""GPU checks (skipped without CUDA): the callback under fp16 AMP, projection on the device."""

from __future__ import annotations

import pytest
import torch

from lrpet_lightning import project_low_rank_
from lrpet_lightning.models import build_model

pytestmark = pytest.mark.gpu


def test_projection_runs_on_the_parameters_device() -> None:
    model = build_model("resnet20").cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    records = project_low_rank_(model, rank_ratio=0.25, example_inputs=x)
    assert all(r.skipped is None for r in records)
    w = model.layer1[0].conv1.weight
    assert w.is_cuda and int(torch.linalg.matrix_rank(w.flatten(1), rtol=1e-5)) == 4


def test_callback_under_fp16_amp() -> None:
    import lightning as L
    from test_callback import RANK, Tiny, conv_ranks

    from lrpet_lightning import LowRankProjectionCallback

    model = Tiny()
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision="16-mixed", max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[LowRankProjectionCallback(rank_ratio=0.25, report=False)],
    )
    trainer.fit(model)
    assert set(conv_ranks(model).values()) == {RANK}
