"""What a run reports: ``results.json``'s status and values (the keys and their meaning:
:mod:`lrpet_lightning.app.schema`), the objective a sweeper maximizes, and the summary
printed at the end. A value that was not measured is None,
never a default 0.0, and nothing non-finite reaches the JSON file."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from lrpet_lightning.app.schema import OBJECTIVE_METRICS
from lrpet_lightning.core.report import CompressionReport, compression_report

__all__ = ["OBJECTIVE_METRICS", "RunProbe", "count_compression", "finished_results",
           "finite_weights", "json_safe", "objective_config", "objective_value", "summary"]

log = logging.getLogger(__name__)


def objective_config(cfg: DictConfig) -> dict[str, Any] | None:
    """The checked ``objective`` node, or None when no objective is asked for."""
    node = cfg.get("objective")
    if node is None or node.get("metric") is None:
        return None
    metric = node.metric
    if metric not in OBJECTIVE_METRICS:
        raise ValueError(f"objective.metric must be one of {', '.join(OBJECTIVE_METRICS)} "
                         f"(or null), got {metric!r}")
    if metric.startswith("test_") and not cfg.get("test", True):
        raise ValueError(f"objective.metric={metric} needs the test split, but test=false; "
                         f"use objective.metric=val_acc or test=true")
    floor, penalty = node.get("min_flops_reduction", 0.0), node.get("flops_penalty", 0.0)
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < 1:
        raise ValueError(f"objective.min_flops_reduction must be a number in [0, 1), "
                         f"got {floor!r}")
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty >= 0:
        raise ValueError(f"objective.flops_penalty must be a number >= 0, got {penalty!r}")
    return {"metric": metric, "min_flops_reduction": float(floor),
            "flops_penalty": float(penalty)}


def objective_value(results: dict[str, Any], metric: str, min_flops_reduction: float,
               flops_penalty: float) -> float:
    """``metric - flops_penalty * max(0, min_flops_reduction - flops_reduction)``: the number
    a sweeper maximizes (a run short of the FLOPs budget pays for each point it misses)."""
    value = results.get(metric)
    if value is None:
        log.warning("objective.metric %s was not measured in this run; the objective is NaN",
                    metric)
        return float("nan")
    reduction = results.get("flops_reduction")
    if reduction is None:  # not measured (e.g. a diverged run): only harmless without a floor
        if min_flops_reduction > 0:
            log.warning("flops_reduction was not measured in this run; with "
                        "objective.min_flops_reduction=%s the objective is NaN",
                        min_flops_reduction)
            return float("nan")
        reduction = 0.0
    shortfall = max(0.0, min_flops_reduction - reduction)
    return float(value) - flops_penalty * shortfall


class RunProbe(pl.Callback):
    """What ``fit`` did: how many training batches ran, whether the training loop ended
    (``on_train_end`` reached: a later failure is a fault at fit end, after the work), and
    the last finite validation metrics (what a diverged run reports)."""

    def __init__(self) -> None:
        self.batches = 0
        self.trained = False
        self.last_val: dict[str, float] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.batches += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trained = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and math.isfinite(float(v))}
        if metrics:
            self.last_val = {**metrics, "epoch": trainer.current_epoch}


def finite_weights(net: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in net.state_dict().values()
               if v.is_floating_point())


def json_safe(value: Any) -> Any:
    """``value`` with NaN and inf replaced by None: ``json.dumps`` writes them as ``NaN``,
    which is not JSON (other readers, and ``allow_nan=False``, reject the file)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def summary(results: dict[str, Any]) -> str:
    def pct(x: Any) -> str:
        return "-" if x is None else f"{100 * x:.2f} %"

    budget = [(f"target {key[7:].replace('_', ' ')}", f"{pct(results[key])} "
               f"({results['allocation']})") for key in ("target_flops_reduction",
                                                        "target_params_reduction")
              if results.get(key) is not None]
    rows = [("model", results["arch"]), ("rank_ratio", str(results["rank_ratio"])), *budget,
            ("test top-1 (compact)", pct(results["test_acc"])),
            ("val top-1 (compact)", pct(results["val_acc"])),
            ("FLOPs reduction", pct(results["flops_reduction"])),
            ("params reduction", pct(results["params_reduction"])),
            ("wall time", f"{results['wall_time_s']:.1f} s"),
            ("compact model", results.get("compact_model", "-")),
            ("results", str(Path(results["output_dir"]) / "results.json"))]
    if "objective" in results:
        objective = results["objective"]
        rows.insert(-2, ("objective", "-" if objective is None else f"{objective:.4f}"))
    if results.get("status", "finished") != "finished":
        rows.insert(1, ("status", results["status"]))
    if results.get("errors"):
        rows.insert(-2, ("errors", "; ".join(e["step"] for e in results["errors"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "LRPET run summary", *(f"  {k.ljust(width)}  {v}" for k, v in rows)])


def finished_results(out: Path) -> dict[str, Any] | None:
    """The run dir's results.json if it records a finished run, else None."""
    path = out / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    finished = isinstance(results, dict) and results.get("status", "finished") in (
        "finished", "already_finished")
    return results if finished else None


def count_compression(dense: torch.nn.Module, compact: torch.nn.Module,
                       datamodule: Any) -> CompressionReport:
    """FLOPs and parameters of ``compact`` against ``dense``, on one input of the data's
    shape (reductions do not depend on the batch size)."""
    example = torch.zeros(datamodule.example_input_shape)
    device = next(compact.parameters()).device
    return compression_report(dense, compact, example.to(device))
