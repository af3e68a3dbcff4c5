"""The one schema of ``results.json``: its keys and what they mean.

``lrpet-train`` writes it (:func:`lrpet_lightning.app.train.train`) and ``lrpet-summarize``
reads it (:mod:`lrpet_lightning.app.summarize`); both take the keys from here. A value that
was not measured is None (JSON null), never a default 0.0, and nothing non-finite is written.

>>> set(REQUIRED_KEYS) <= set(RESULT_KEYS)
True
"""

from __future__ import annotations

__all__ = ["ACCURACY_METRICS", "OBJECTIVE_METRICS", "OPTIONAL_KEYS", "REQUIRED_KEYS",
           "RESULT_KEYS", "STATUSES"]

#: What ``results["status"]`` may say.
STATUSES = ("finished", "diverged", "failed", "already_finished")

#: Every key of results.json and its meaning.
RESULT_KEYS: dict[str, str] = {
    "status": "how the run ended, one of STATUSES: finished; diverged (a non-finite "
              "training loss or weights stopped it; the metrics are the last finite "
              "ones); failed (a step at fit end failed, e.g. the decomposition); "
              "already_finished (a relaunch of a run whose training was over)",
    "variant": "lrpet, or the baseline run at the same ranks and epochs: thin_init "
               "(decomposed at initialization), dense_finetune (trained dense, truncated, "
               "fine-tuned thin) or dense",
    "val_acc": "top-1 accuracy of the final (compact) model on the validation split",
    "test_acc": "top-1 accuracy of the final (compact) model on the test split "
                "(None with test=false)",
    "test_acc_top5": "top-5 accuracy on the test split (None with test=false)",
    "arch": "the model's name (model.arch)",
    "lrpet": "whether the run had the LRPET callback (false: a dense baseline)",
    "rank_ratio": "the callback's rank_ratio (None: per-layer ranks or a budget)",
    "target_flops_reduction": "a FLOPs budget's target (None without one)",
    "target_params_reduction": "a parameters budget's target (None without one)",
    "allocation": "how a budget was shared, uniform | spectrum (None without a budget)",
    "flops_reduction": "measured fraction of FLOPs the compact model sheds (0.0 for a "
                       "dense baseline; None: not measured)",
    "params_reduction": "measured fraction of parameters the compact model sheds",
    "epochs": "training epochs done (trainer.current_epoch at the end)",
    "num_projections": "LRPET projections done (None for a dense baseline)",
    "wall_time_s": "seconds this launch took, training and evaluation",
    "output_dir": "the run dir",
    "errors": "[{step, error}] of the steps after training that failed (logged, recorded, "
              "and never losing the rest of the results)",
    "diverged_at": "{epoch, step, loss} of the first non-finite training loss",
    "last_finite_val": "the last finite validation metrics of a diverged run",
    "report": "path of the run dir's compression_report.json",
    "compact_model": "path of the saved compact model (compact_model_name)",
    "compression_plot": "path of compression_report.png",
    "reference_protocol": "protocol=reference only: {best_test_acc, best_test_acc_top5, "
                          "best_epoch, last_k, epochs_evaluated, test_acc_by_epoch, note}: "
                          "the best test top-1 of the last last_k epochs, each measured "
                          "before that epoch's projection; selected on the test split",
    "bn_recalibration_batches": "bn_recalibration > 0 only: the training batches the final "
                                "model's BatchNorm statistics were recomputed on (the "
                                "scores and the compact model are after it)",
    "objective": "what a sweeper maximizes: metric - flops_penalty * max(0, "
                 "min_flops_reduction - flops_reduction) (with objective.metric set)",
}
#: Keys every results.json of lrpet-train holds; the others only where they apply.
REQUIRED_KEYS = ("status", "variant", "val_acc", "test_acc", "test_acc_top5", "arch", "lrpet",
                 "rank_ratio", "target_flops_reduction", "target_params_reduction",
                 "allocation", "flops_reduction", "params_reduction", "epochs",
                 "num_projections", "wall_time_s", "output_dir", "errors")
OPTIONAL_KEYS = tuple(k for k in RESULT_KEYS if k not in REQUIRED_KEYS)
#: Keys ``objective.metric`` may name (higher is better for each).
OBJECTIVE_METRICS = ("val_acc", "test_acc", "test_acc_top5", "flops_reduction",
                     "params_reduction")
#: Accuracies lrpet-summarize's plot and Pareto front may use.
ACCURACY_METRICS = ("test_acc", "val_acc")
