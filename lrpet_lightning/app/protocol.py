"""The evaluation protocol of a run: ``protocol=standard`` (the default) or ``reference``.

- ``standard``: the model is selected on nothing. Validation is a held-out part of the
  training images; the final compact model is tested once on the test split, and that is
  the number a run reports (``test_acc``).
- ``reference``: the protocol of the authors' reference code, for comparing with its
  published table. It trains on every training image (``data.val_size=0``, where the
  datamodule has it), evaluates the test split at the end of each of the last
  ``best_of_last`` epochs *before* that epoch's projection, and reports the best of those
  accuracies (``reference_protocol`` in ``results.json``) beside the final compact model's
  ``test_acc``. That number is selected on the test set, and it scores weights that are
  not yet projected: it is a comparison with the paper's table, not a held-out result.

:class:`PreProjectionEvaluator` does the evaluating; its accuracies are checkpointed, so a
resumed run reports what an uninterrupted one would.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, open_dict

from lrpet_lightning.core.checks import check_choice, check_int

__all__ = ["PROTOCOLS", "PreProjectionEvaluator", "apply_protocol", "protocol_results"]

log = logging.getLogger(__name__)

#: Names ``protocol.name`` accepts.
PROTOCOLS = ("standard", "reference")


class PreProjectionEvaluator(pl.Callback):
    """Test-split top-1 (and top-5) at the end of each of the last ``last_k`` epochs, before
    that epoch's projection.

    It acts on the epoch's last training batch, like the LRPET callback's epoch schedule,
    and must come before that callback in ``trainer.callbacks`` (Lightning calls callbacks
    in that order), so it sees the weights SGD left, as the reference code's test does.

    Args:
        last_k: how many final epochs are evaluated (the reference: 100 of 400).
    """

    def __init__(self, last_k: int) -> None:
        self.last_k = check_int("protocol.best_of_last", last_k, minimum=1,
                                meaning="final epochs whose test accuracy is recorded")
        #: ``{epoch: {"acc": top-1, "acc_top5": top-5}}`` of the epochs evaluated so far.
        self.accuracies: dict[int, dict[str, float]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"accuracies": {str(e): dict(a) for e, a in self.accuracies.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accuracies = {int(e): dict(a) for e, a in state_dict["accuracies"].items()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        epoch = trainer.current_epoch
        if not trainer.is_last_batch or trainer.max_epochs is None \
                or epoch < trainer.max_epochs - self.last_k:
            return
        self.accuracies[epoch] = self.evaluate(trainer.datamodule, pl_module)

    @staticmethod
    @torch.no_grad()
    def evaluate(datamodule: Any, module: torch.nn.Module) -> dict[str, float]:
        """Top-1 and top-5 accuracy of ``module`` on ``datamodule``'s test split, in eval
        mode (every process evaluates the whole split: the replicas are identical)."""
        if getattr(datamodule, "test_set", None) is None:
            datamodule.setup("test")
        training = module.training
        module.eval()
        device = next(module.parameters()).device
        correct1 = correct5 = total = 0
        try:
            for x, y in datamodule.test_dataloader():
                logits = module(x.to(device))
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
                hits = top == y.reshape(-1, 1)
                correct1 += int(hits[:, 0].sum())
                correct5 += int(hits.any(dim=1).sum())
                total += len(y)
        finally:
            module.train(training)
        return {"acc": correct1 / total, "acc_top5": correct5 / total}


def apply_protocol(cfg: DictConfig) -> PreProjectionEvaluator | None:
    """Check ``cfg.protocol``; for ``reference``, set ``cfg.data.val_size=0`` (where the data
    have it) and return the evaluator to put before the LRPET callback.

    Raises:
        TypeError, ValueError: a bad ``protocol.name`` or ``protocol.best_of_last``.
    """
    node = cfg.get("protocol")
    name = "standard" if node is None else node.get("name", "standard")
    check_choice("protocol.name", name, PROTOCOLS)
    if name == "standard":
        return None
    evaluator = PreProjectionEvaluator(node.get("best_of_last", 100))
    if cfg.data.get("val_size") not in (None, 0):
        log.warning("protocol=reference trains on every training image: data.val_size=%s "
                    "is set to 0, and validation runs on the test split", cfg.data.val_size)
        with open_dict(cfg):
            cfg.data.val_size = 0
    log.warning("protocol=reference: the reported best-of-last-%d accuracy is selected on "
                "the TEST split and scores unprojected weights (the reference code's "
                "protocol); test_acc stays the final compact model's", evaluator.last_k)
    return evaluator


def protocol_results(evaluator: PreProjectionEvaluator | None) -> dict[str, Any] | None:
    """``results["reference_protocol"]``: the best recorded epoch and every epoch's score
    (None under the standard protocol)."""
    if evaluator is None:
        return None
    scores = evaluator.accuracies
    best = max(scores, key=lambda e: (scores[e]["acc"], -e)) if scores else None
    return {
        "best_test_acc": scores[best]["acc"] if best is not None else None,
        "best_test_acc_top5": scores[best]["acc_top5"] if best is not None else None,
        "best_epoch": best,
        "last_k": evaluator.last_k,
        "epochs_evaluated": len(scores),
        "test_acc_by_epoch": {str(e): scores[e]["acc"] for e in sorted(scores)},
        "note": "selected on the test split, on weights before that epoch's projection "
                "(the reference code's protocol); not a held-out figure",
    }
