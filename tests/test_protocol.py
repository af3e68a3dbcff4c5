"""protocol=reference: all training images, the test split scored before each projection,
best of the last K epochs reported beside (never instead of) the final compact model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_RUN, Tiny, compose, conv_ranks, make_trainer

from lrpet_lightning import LowRankProjectionCallback
from lrpet_lightning.app.protocol import PreProjectionEvaluator, apply_protocol
from lrpet_lightning.app.train import train


class _TinyData:
    """What the evaluator needs of a datamodule: a test split and its loader."""

    def __init__(self, module: Tiny) -> None:
        self.module = module
        self.test_set = True

    def test_dataloader(self):
        return self.module.test_dataloader()


def test_evaluator_scores_the_weights_before_the_projection(monkeypatch) -> None:
    # Epoch 0 projects; SGD in epoch 1 makes the weights full rank again, and the
    # evaluator, before epoch 1's projection, must see them so (after it: rank 4).
    seen: list[dict[str, int]] = []
    module = Tiny()

    def spy(datamodule, model):
        seen.append(conv_ranks(model))
        return {"acc": 0.5, "acc_top5": 1.0}

    evaluator = PreProjectionEvaluator(last_k=2)
    monkeypatch.setattr(evaluator, "evaluate", spy)
    lrpet = LowRankProjectionCallback(rank_ratio=0.25, final_projection=False)
    trainer = make_trainer([evaluator, lrpet], max_epochs=3)
    trainer.fit(module)
    assert sorted(evaluator.accuracies) == [1, 2]  # the last two epochs only
    assert all(rank > 4 for ranks in seen for rank in ranks.values()), seen
    assert all(rank == 4 for rank in conv_ranks(module).values())  # projected after


def test_evaluator_accuracy_is_the_models() -> None:
    module = Tiny()
    scores = PreProjectionEvaluator.evaluate(_TinyData(module), module)
    x, y = module.test_dataloader().dataset.tensors
    with torch.no_grad():
        expected = float((module(x).argmax(1) == y).float().mean())
    assert scores["acc"] == pytest.approx(expected)
    assert module.training  # the train flag is restored


def test_evaluator_state_round_trips() -> None:
    evaluator = PreProjectionEvaluator(last_k=3)
    evaluator.accuracies = {7: {"acc": 0.25, "acc_top5": 0.75}}
    again = PreProjectionEvaluator(last_k=3)
    again.load_state_dict(json.loads(json.dumps(evaluator.state_dict())))
    assert again.accuracies == evaluator.accuracies


def test_reference_protocol_trains_on_all_training_images() -> None:
    cfg = compose("data=cifar10", "protocol=reference")
    assert cfg.data.val_size == 5000
    evaluator = apply_protocol(cfg)
    assert cfg.data.val_size == 0 and evaluator.last_k == 100
    assert apply_protocol(compose("data=cifar10")) is None  # standard: nothing changes


@pytest.mark.parametrize(("override", "error", "match"), [
    ("protocol.name=paper", ValueError, "protocol.name must be one of"),
    ("protocol.best_of_last=0", ValueError, "protocol.best_of_last must be"),
    ("protocol.best_of_last=two", TypeError, "protocol.best_of_last must be"),
])
def test_bad_protocol_is_refused(override: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        apply_protocol(compose("protocol=reference", override))


def test_app_reports_best_of_last_beside_the_compact_model(tmp_path) -> None:
    cfg = compose(f"output_dir={tmp_path}", *TINY_RUN, "trainer.max_epochs=3",
                  "protocol=reference", "protocol.best_of_last=2")
    results = train(cfg)
    ref = results["reference_protocol"]
    assert ref["epochs_evaluated"] == 2 and set(ref["test_acc_by_epoch"]) == {"1", "2"}
    assert ref["best_test_acc"] == max(ref["test_acc_by_epoch"].values())
    assert "test split" in ref["note"]
    assert results["test_acc"] is not None  # the compact model's, reported as well
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["reference_protocol"] == ref


def test_app_puts_the_evaluator_before_the_lrpet_callback(tmp_path) -> None:
    from lrpet_lightning.app.build import build

    run = build(compose(f"output_dir={tmp_path}", *TINY_RUN, "protocol=reference"))
    kinds = [type(c) for c in run.trainer.callbacks]
    assert kinds.index(PreProjectionEvaluator) < kinds.index(LowRankProjectionCallback)
    assert run.evaluator is not None
