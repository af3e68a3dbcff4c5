"""Lightning-side helpers of :class:`~lrpet_lightning.LowRankProjectionCallback`: checks of
its schedule and of the strategy, logging and publishing what it measured, and the load hook
that lets a decomposed checkpoint load into a dense module. The class keeps the schedule, the
hooks and the checkpointed state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lrpet_lightning.core.checks import check_int
from lrpet_lightning.core.report import CompressionReport, projection_summary
from lrpet_lightning.core.transforms import LayerRecord, match_architecture_

__all__ = ["check_schedule", "log_projection", "match_checkpoint", "publish_report",
           "refuse_sharded", "spawned"]

# Strategies that shard parameters: no process holds a whole weight matrix to project.
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel")


def check_schedule(every_n_epochs: Any, every_n_train_steps: Any, start: Any,
                   stop: Any) -> tuple[int | None, int | None, int, int | None]:
    """The schedule arguments checked: one schedule (epochs by default), ``start < stop``."""
    if every_n_epochs is not None and every_n_train_steps is not None:
        raise ValueError(
            f"every_n_epochs={every_n_epochs!r} and every_n_train_steps="
            f"{every_n_train_steps!r} are both set; choose one schedule"
        )
    every_n_epochs = check_int("every_n_epochs", every_n_epochs, 1, optional=True)
    every_n_train_steps = check_int("every_n_train_steps", every_n_train_steps, 1,
                                    optional=True)
    start = check_int("start", start, 0)
    stop = check_int("stop", stop, 1, optional=True)
    if stop is not None and stop <= start:
        raise ValueError(f"stop must be greater than start={start}, got {stop!r}")
    return every_n_epochs or (None if every_n_train_steps else 1), every_n_train_steps, start, stop


def refuse_sharded(trainer: pl.Trainer) -> None:
    # Match on the class hierarchy's names so subclasses of these strategies are refused
    # too, without importing optional backends (deepspeed) just to check.
    names = [cls.__name__ for cls in type(trainer.strategy).__mro__]
    if any(s in n for n in names for s in _UNSUPPORTED_STRATEGIES):
        raise MisconfigurationException(
            f"LowRankProjectionCallback does not support the {names[0]} strategy: it "
            "shards parameters, so no process holds a whole weight matrix to project. Use "
            "strategy='ddp' (or 'ddp_spawn', or a single device)."
        )


def log_projection(trainer: pl.Trainer, records: Sequence[LayerRecord], seconds: float,
                   count: int, per_layer: bool, final: bool) -> None:
    """Log one projection through the trainer's loggers (and the final one's summary)."""
    metrics = {"lrpet/projection_time_s": seconds, "lrpet/num_projections": float(count),
               **{f"lrpet/{k}": v for k, v in projection_summary(records, per_layer).items()}}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    if final:
        done = sum(r.skipped is None for r in records)
        rank_zero_info(f"LRPET: final projection of {done} layer(s) in {seconds:.2f} s")


def publish_report(trainer: pl.Trainer, report: CompressionReport, log_dir: str) -> None:
    """Print and save the report (rank 0) and log its two reductions (every rank)."""
    if trainer.is_global_zero:
        rank_zero_info("LRPET compression report:\n" + report.format_table())
        path = os.path.join(log_dir, "compression_report.json")
        try:
            report.save(path)
        except OSError as err:  # a read-only log dir must not lose the decomposition
            rank_zero_warn(f"LRPET: the compression report could not be written to {path}: "
                           f"{type(err).__name__}: {err}")
    for logger in trainer.loggers:
        logger.log_metrics({"lrpet/flops_reduction": report.flops_reduction,
                            "lrpet/params_reduction": report.params_reduction},
                           step=trainer.global_step)


def spawned(trainer: pl.Trainer) -> bool:
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def match_checkpoint(module: nn.Module, state_dict: Mapping[str, Any], prefix: str,
                     *args: Any) -> None:
    decomposed = match_architecture_(module, state_dict, prefix)
    if decomposed:
        rank_zero_info(f"LRPET: decomposed {len(decomposed)} layer(s) to load a checkpoint "
                       "of a decomposed model")
