"""``LowRankProjectionCallback``: LRPET for any LightningModule, a thin scheduler over the core.

The callback decides *when* (the schedule, :meth:`~LowRankProjectionCallback.should_project`),
keeps the checkpointed state and reports through Lightning; the work is the core's:
planning (:mod:`~lrpet_lightning.core.plan`), tracing BatchNorms and recording an input
(:mod:`~lrpet_lightning.core.trace`), finding the network inside the LightningModule
(:mod:`~lrpet_lightning.core.network`), projecting (:mod:`~lrpet_lightning.core.distributed`),
solving a budget (:mod:`~lrpet_lightning.core.budget`) and the compression report
(:mod:`~lrpet_lightning.core.report`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lrpet_lightning.callback_support import (
    check_schedule,
    log_projection,
    match_checkpoint,
    publish_report,
    refuse_sharded,
    spawned,
)
from lrpet_lightning.core.batchnorm import load_norm_statistics_, norm_statistics, running_norms
from lrpet_lightning.core.budget import RankSolution
from lrpet_lightning.core.checkpoint import optimizers_match
from lrpet_lightning.core.checks import check_bool, check_int
from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.distributed import project_layers_distributed_
from lrpet_lightning.core.network import Network, find_network
from lrpet_lightning.core.report import CompressionReport
from lrpet_lightning.core.transforms import (
    LayerRecord,
    decompose_,
    decomposed_ranks,
)
from lrpet_lightning.core.walk import TargetLayer
from lrpet_lightning.fit_state import FitState

__all__ = ["LowRankProjectionCallback"]

# A projection that skipped no layer for one of these reasons leaves the weights exactly low rank.
_EXACT_SKIPS = (None, "rank >= full rank", "all-zero layer")


class LowRankProjectionCallback(Callback):
    r"""Train a low-rank network from scratch with LRPET (low-rank projection with energy transfer).

    SGD runs at full size; on schedule, every targeted weight matrix is projected onto rank
    ``r`` by truncated SVD, with energy transfer and BN rectification, written into the same
    Parameter objects (the optimizer and its momentum are untouched). At fit end a final
    projection makes the weights exactly low rank, and a compression report (FLOPs and
    parameters of the two-thin-layer model) is logged, printed and written to
    ``<trainer.log_dir>/compression_report.json``.

    - Epoch schedule: on the epoch's last batch, before validation and checkpointing; step
      schedule: right after an optimizer step; or override :meth:`should_project`.
    - Logged: ``lrpet/projection_time_s``, ``lrpet/num_projections``, ``lrpet/mean_kept_energy``,
      ``lrpet/mean_relative_change``, ``lrpet/flops_reduction``, ``lrpet/params_reduction``.
    - A FLOPs or parameters budget instead of ``rank_ratio`` is solved once and its ranks
      frozen and checkpointed (docs/budgets.md). Checkpointed per ``state_key``: the
      counters, ``ranks`` (also :attr:`ranks`), ``budget_ranks``, ``decomposed_ranks``.
    - DDP, AMP, ``bf16-true`` and ``torch.compile`` work; FSDP, DeepSpeed and
      ModelParallel shard parameters and are refused in ``setup``.

    Args:
        rank_ratio: kept fraction of each layer's full rank, in (0, 1].
        ranks: ``{module-name pattern: ratio (float) or rank (int)}`` overrides.
        energy_transfer, residual_scale, bn_rectification, include_linear, include,
            exclude, min_rank, svd_method: as in :func:`lrpet_lightning.project_low_rank_`.
        rank_multiple: round every rank from ``rank_ratio``, a float in ``ranks`` or a
            budget to a multiple of it (8: faster kernels), or to the layer's full rank;
            an int in ``ranks`` is kept as given (docs/budgets.md). Default 1: no rounding.
        target_flops_reduction: a FLOPs budget instead of ``rank_ratio`` (give
            ``rank_ratio=None``): the fraction of FLOPs the decomposed model sheds, in (0, 1).
        target_params_reduction: the same for parameters (one budget at most).
        allocation: ``"uniform"`` or ``"spectrum"``: how the budget is shared by the layers
            (see :func:`lrpet_lightning.solve_ranks`). Ignored without a budget.
        budget_warmup_epochs: epochs at full rank before a ``"spectrum"`` budget is solved.
        every_n_epochs: project at the end of every n-th training epoch (CIFAR recipe: 1).
            Default 1 unless ``every_n_train_steps`` is given.
        every_n_train_steps: project after every n-th optimizer step, counted on
            ``trainer.global_step`` so gradient accumulation is right (ImageNet recipe: 250).
        start: no scheduled projection before this epoch (epoch schedule, 0-based) or
            optimizer step (step schedule): a warm-up at full rank.
        stop: no scheduled projection from this epoch / step on (None: until the end).
        final_projection: project once more when training ends, by plain truncation (the
            closest rank-r model), so the trained model is exactly low rank; skipped when the
            last scheduled projection already ran after the last optimizer step.
        bn_recalibration: after each projection (the final one too), recompute the
            BatchNorm running statistics on the network's inputs of the last this many
            training batches, kept in memory (references to the batches, on their device):
            without it they describe the weights before the projection, and the validation
            that follows (and a final model tested as it is) scores below what the weights
            can do (docs/app.md). Default 0: off, as in the paper. The kept batches are
            not checkpointed: a projection within this many batches of a resume uses the
            batches seen since (so that resume is not bit-exact), and says so.
        decompose_on_fit_end: replace each projected layer by its two thin layers when
            training ends (dense checkpoints such as ``"best"`` still load into it).
        log_per_layer: also log each layer's kept energy and relative change.
        report: compute, print and save the compression report at fit end.

    Raises:
        TypeError: an argument of the wrong type (``every_n_epochs="2"``), at construction.
        ValueError: an argument out of range (``every_n_epochs=0``), or two schedules.
        MisconfigurationException: in ``setup``, for a strategy that shards parameters.

    Example::

        trainer = L.Trainer(callbacks=[LowRankProjectionCallback(rank_ratio=0.25)])
        trainer.fit(model, datamodule)
    """

    def __init__(
        self, rank_ratio: float | None = None, ranks: Mapping[str, float | int] | None = None,
        energy_transfer: bool = True, residual_scale: float = 0.0, bn_rectification: bool = True,
        include_linear: bool = False, include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None, min_rank: int = 1, svd_method: str = "gram",
        target_flops_reduction: float | None = None,
        target_params_reduction: float | None = None, allocation: str = "uniform",
        rank_multiple: int = 1, budget_warmup_epochs: int = 1, every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None, start: int = 0, stop: int | None = None,
        final_projection: bool = True, bn_recalibration: int = 0,
        decompose_on_fit_end: bool = False, log_per_layer: bool = False, report: bool = True,
    ) -> None:
        super().__init__()
        self.config = LowRankConfig(
            rank_ratio=rank_ratio, ranks=ranks, energy_transfer=energy_transfer,
            residual_scale=residual_scale, bn_rectification=bn_rectification,
            include_linear=include_linear, include=include, exclude=exclude,
            min_rank=min_rank, svd_method=svd_method,
            target_flops_reduction=target_flops_reduction,
            target_params_reduction=target_params_reduction, allocation=allocation,
            rank_multiple=rank_multiple,
        )
        self.budget_warmup_epochs = check_int("budget_warmup_epochs", budget_warmup_epochs, 0)
        self.every_n_epochs, self.every_n_train_steps, self.start, self.stop = check_schedule(
            every_n_epochs, every_n_train_steps, start, stop)
        self.final_projection = check_bool("final_projection", final_projection)
        self.bn_recalibration = check_int("bn_recalibration", bn_recalibration, 0,
                                          meaning="training batches to recompute BatchNorm "
                                                  "statistics on after a projection; 0: off")
        self.decompose_on_fit_end = check_bool("decompose_on_fit_end", decompose_on_fit_end)
        self.log_per_layer = check_bool("log_per_layer", log_per_layer)
        self.report = check_bool("report", report)

        # Run-time state: the counters are checkpointed and run on across fits.
        self.num_projections = 0
        self.last_projected_step = -1
        self.last_projected_epoch = -1
        #: The records of the last projection (see also :attr:`records`).
        self.last_records: list[LayerRecord] = []
        #: The compression report of the last fit (None until one is made).
        self.compression: CompressionReport | None = None
        self._hooked: nn.Module | None = None  # the module whose loads match checkpoints
        self._fit = FitState()

    # ------------------------------------------------------------------ identity / state
    @property
    def ranks(self) -> dict[str, int]:
        """``{layer: rank}`` the layers are projected (and decomposed) at: the checkpointed
        ``state_dict()["ranks"]``. Empty before planning, and while a budget is unsolved."""
        return dict(self._fit.ranks)

    @property
    def records(self) -> list[LayerRecord]:
        """The :class:`LayerRecord` of every layer at the last projection."""
        return list(self.last_records)

    @property
    def first_records(self) -> list[LayerRecord]:
        """The records of this fit's first projection (a diagnostic: not checkpointed)."""
        return self._fit.first_records

    @property
    def budget_solution(self) -> RankSolution | None:
        """What the budget solver found in this fit (this process only; not checkpointed)."""
        return self._fit.budget_solution

    @property
    @override
    def state_key(self) -> str:
        # The budget's keys only when there is one: older checkpoints keep their key.
        budget = {} if self.config.budget is None else {
            f"target_{self.config.budget[0]}_reduction": self.config.budget[1],
            "allocation": self.config.allocation,
        }
        # Likewise rank_multiple only when it rounds: a budget's ranks restored under the
        # same key would otherwise silently keep the other rounding.
        if self.config.rank_multiple != 1:
            budget["rank_multiple"] = self.config.rank_multiple
        return self._generate_state_key(
            rank_ratio=self.config.rank_ratio, ranks=self.config.ranks,
            include=self.config.include, exclude=self.config.exclude,
            every_n_epochs=self.every_n_epochs, every_n_train_steps=self.every_n_train_steps,
            **budget,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        budget_ranks = self._fit.budget_ranks
        return {
            "num_projections": self.num_projections,
            "last_projected_step": self.last_projected_step,
            "last_projected_epoch": self.last_projected_epoch,
            "ranks": self.ranks,
            # A budget's ranks once solved (None before): a resumed run keeps them.
            "budget_ranks": None if budget_ranks is None else dict(budget_ranks),
            # The module's own thin layers (not restored state: a dense "best" checkpoint
            # loaded into the decomposed module leaves it decomposed).
            "decomposed_ranks": {} if self._hooked is None else decomposed_ranks(self._hooked),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # "decomposed_ranks" is not read back: a load rebuilds the thin layers from the
        # weights' shapes (match_checkpoint), also in trainer.test, which restores no callback.
        self.num_projections = state_dict["num_projections"]
        self.last_projected_step = state_dict["last_projected_step"]
        self.last_projected_epoch = state_dict["last_projected_epoch"]
        self._fit.ranks = dict(state_dict.get("ranks", {}))
        budget_ranks = state_dict.get("budget_ranks")
        self._fit.budget_ranks = None if budget_ranks is None else dict(budget_ranks)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Runs before Lightning hands each callback its state: a relaunch whose LRPET
        # settings changed (another rank_ratio) finds its state under another key, which
        # Lightning would skip with a generic notice. Say what it means; with one such
        # state, carry its counters on (results count every projection the weights had).
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        others = [k for k in states if str(k).startswith(type(self).__name__)]
        if not others:
            return
        carried = len(others) == 1 and sum(
            isinstance(c, LowRankProjectionCallback) for c in trainer.callbacks) == 1
        if carried:
            old = states[others[0]]
            self.num_projections = old.get("num_projections", 0)
            self.last_projected_step = old.get("last_projected_step", -1)
            self.last_projected_epoch = old.get("last_projected_epoch", -1)
        rank_zero_warn(
            f"LRPET: the checkpoint's LRPET state was saved with other settings "
            f"({'; '.join(map(str, others))}), not these ({self.state_key}). The ranks are "
            "planned from the current settings" + (" (a solved budget is solved again)"
            if self.config.budget is not None else "") + "; "
            + (f"the projection count goes on from {self.num_projections}" if carried
               else "the counters start from 0") + ". Relaunch with the same settings to "
            "resume the run as it was.")

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Saved after decompose_on_fit_end (ModelCheckpoint's on_train_end runs after ours):
        # the optimizers' dense parameters are gone and their state would not load.
        if checkpoint.get("optimizer_states") and not optimizers_match(pl_module,
                                                                       trainer.optimizers):
            checkpoint["optimizer_states"] = []

    # ------------------------------------------------------------------------ schedule
    def should_project(self, step: int, epoch: int) -> bool:
        """Whether a scheduled projection fires now. Override for custom schedules.

        Called after every optimizer step (step schedule; ``step`` = optimizer steps done)
        or at the end of every training epoch (epoch schedule; ``epoch`` is 0-based).
        """
        if self.every_n_train_steps is not None:
            t, n = step, self.every_n_train_steps
            return t % n == 0 and t >= self.start and (self.stop is None or t < self.stop)
        return ((epoch + 1) % self.every_n_epochs == 0 and epoch >= self.start
                and (self.stop is None or epoch < self.stop))

    # ---------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A checkpoint of a decomposed model must load into a dense module too (resume,
        # trainer.test(ckpt_path=...)): before any load, decompose the layers it holds as
        # thin pairs. The reverse needs nothing (a factorized layer splits a dense weight).
        if self._hooked is not pl_module:
            pl_module.register_load_state_dict_pre_hook(match_checkpoint)
            self._hooked = pl_module
        if stage != "fit":
            return  # the rest only acts while fitting
        # Plan afresh in every fit: this one may train another model. (A resumed fit gets
        # its budget ranks back from the checkpoint, which is restored after setup.)
        self._fit = FitState()
        refuse_sharded(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Plan here, after configure_model and before the first step, so that a pattern
        # that matches nothing fails before any training time is spent. (For a budget:
        # every targeted layer at full rank until the budget is solved.)
        fit = self._fit
        for info, message in fit.plan_for(pl_module, self.config):
            (rank_zero_info if info else rank_zero_warn)("LRPET: " + message)
        _check_overlap(self, trainer, fit.layers)
        fit.check_budget(self._network(pl_module), self.config)  # a parameter budget: now
        rank_zero_info(f"LRPET: projecting {len(fit.layers)} layer(s) "
                       + (f"every {self.every_n_train_steps} optimizer step(s)"
                          if self.every_n_train_steps else f"every {self.every_n_epochs} epoch(s)"))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        fit = self._fit
        fit.step_at_batch_start = trainer.global_step
        if self.bn_recalibration and fit.recent is None and fit.layers:
            network = self._network(pl_module)
            fit.keep_recent_inputs(network.called, self.bn_recalibration)
            inside = {id(m) for m in network.eager.modules()}
            outside = [n for n, m in running_norms(pl_module).items() if id(m) not in inside]
            if outside:
                rank_zero_warn(f"LRPET: bn_recalibration replays {network.prefix!r}, the "
                               "network holding the projected layers; these norms outside "
                               "it keep the statistics training gives them: "
                               + ", ".join(outside))
        if fit.traced or fit.plan is None:
            return
        # Trace conv->BN pairs during this very training step: no extra forward pass; and
        # keep one sample of the network's input, for counting FLOPs.
        counts_flops = self.config.budget is not None and self.config.budget[0] == "flops"
        fit.start_tracing(pl_module, self._network(pl_module).called
                          if self.report or counts_flops else None)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._finish_tracing(pl_module)
        fit, step, epoch = self._fit, trainer.global_step, trainer.current_epoch
        fit.check_budget(self._network(pl_module), self.config)  # FLOPs: the first input
        # Under gradient accumulation most batches do not step the optimizer, and
        # global_step stays put (at 0 before the first step).
        stepped = step != fit.step_at_batch_start
        if stepped:
            fit.exact = False
        if self.every_n_train_steps is not None:
            # Right after a step, once, if a scheduled step was reached or crossed (several
            # optimizers in manual optimization advance global_step by more than one).
            if stepped and any(self.should_project(t, epoch)
                               for t in range(fit.step_at_batch_start + 1, step + 1)):
                self._project(trainer, pl_module)
        elif trainer.is_last_batch:
            # Project on the epoch's last batch, before validation and checkpointing run,
            # so that this epoch's metrics and checkpoints see the projected weights.
            self._maybe_project_epoch(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit.projected_this_epoch = False

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fallback for loaders of unknown length, where no batch was flagged as last.
        if self.every_n_train_steps is None:
            self._maybe_project_epoch(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._fit.remove_hooks()  # a fit that failed in its first step left them behind

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fit.remove_hooks()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_tracing(pl_module)
        fit = self._fit
        if not fit.layers or not fit.traced:  # no training step ran, or nothing planned
            return
        if self.config.budget is not None and fit.budget_ranks is None:
            self._solve_budget(trainer, pl_module)  # training ended within the warm-up
        if self.final_projection and not fit.exact:
            final = dataclasses.replace(self.config, energy_transfer=False, residual_scale=0.0)
            self._project(trainer, pl_module, config=final, final=True)
        if self.report:
            self._write_report(trainer, pl_module)
        if self.decompose_on_fit_end and _decompose(trainer, pl_module, fit.ranks,
                                                    self.config.include_linear):
            fit.plan = None  # the planned modules were replaced

    # ------------------------------------------------------------------------ internals
    def _maybe_project_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._fit.projected_this_epoch and self.should_project(trainer.global_step,
                                                                      trainer.current_epoch):
            self._project(trainer, pl_module)
            self._fit.projected_this_epoch = True

    def _finish_tracing(self, pl_module: pl.LightningModule) -> None:
        for message in self._fit.finish_tracing(pl_module, self.config.bn_rectification):
            rank_zero_warn("LRPET: " + message)

    def _network(self, pl_module: pl.LightningModule) -> Network:
        """The network FLOPs are counted on: the LightningModule's child holding every
        targeted layer (``self.model``, ``self.net``...), else the module itself."""
        return find_network(pl_module, self._fit.ranks or [x.name for x in self._fit.layers])

    def _solve_budget(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        solution = self._fit.solve_budget(self._network(pl_module), self.config,
                                          lambda ranks: trainer.strategy.broadcast(ranks, src=0))
        rank_zero_info(f"LRPET budget solved (epoch {trainer.current_epoch}, step "
                       f"{trainer.global_step}), ranks now frozen: {solution.summary()}")

    def _project(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 config: LowRankConfig | None = None, final: bool = False) -> None:
        fit = self._fit
        if not fit.layers:  # nothing planned (an already decomposed model): no projection
            return
        if self.config.budget is not None and fit.budget_ranks is None:
            # An epoch-end projection comes after the epoch; a step one within it.
            done = trainer.current_epoch + (1 if self.every_n_train_steps is None else 0)
            if not final and fit.budget_pending(self.config, done, self.budget_warmup_epochs):
                return  # warm-up at full rank: the spectra are not worth reading yet
            self._solve_budget(trainer, pl_module)
        config = config or self.config
        t0 = time.perf_counter()
        # Under DDP each layer is projected once, by one rank, and broadcast: the replicas
        # stay bitwise identical and the SVD work is shared (a plain call otherwise).
        records = project_layers_distributed_(fit.layers, config)
        seconds = time.perf_counter() - t0
        # Exactly low rank only if no layer failed (a transient SVD failure at the last
        # scheduled projection must not skip the final one).
        fit.exact = config.residual_scale == 0.0 and all(r.skipped in _EXACT_SKIPS
                                                         for r in records)
        if fit.recent is not None:  # statistics for the weights just projected
            self._recalibrate(trainer, pl_module)
        self.last_records = records
        fit.first_records = fit.first_records or records
        self.num_projections += 1
        self.last_projected_step = trainer.global_step
        self.last_projected_epoch = trainer.current_epoch
        log_projection(trainer, records, seconds, self.num_projections, self.log_per_layer,
                        final)

    def _recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """bn_recalibration: the norms' statistics for the weights just projected; under DDP
        every process then takes rank 0's (each kept its own last batches), one model."""
        try:
            used = self._fit.recent.recalibrate()
            if used < self.bn_recalibration:  # e.g. a projection soon after a resume
                rank_zero_info(f"LRPET: bn_recalibration used the {used} training batch(es) "
                               f"seen since this fit started, not {self.bn_recalibration}")
        except Exception as err:  # noqa: BLE001 - never lose the training over statistics
            rank_zero_warn(f"LRPET: bn_recalibration failed ({type(err).__name__}: {err}); "
                           "the BatchNorm statistics stay as training left them")
        if trainer.world_size > 1:  # on every rank, whatever its replay did: no hang
            load_norm_statistics_(pl_module, trainer.strategy.broadcast(
                norm_statistics(pl_module), src=0))

    def _write_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective: on every rank
        if self._fit.example_inputs is None:
            rank_zero_warn("LRPET: no model input was seen during training; the compression "
                           "report is skipped")
            return
        try:
            self.compression = self._fit.report(self._network(pl_module),
                                                self.config.include_linear)
        except Exception as err:  # noqa: BLE001 - a report must not fail a finished training
            rank_zero_warn(f"LRPET: the compression report failed and is skipped: "
                           f"{type(err).__name__}: {err}")
            return
        publish_report(trainer, self.compression, log_dir)


def _decompose(trainer: pl.Trainer, pl_module: pl.LightningModule, ranks: Mapping[str, int],
               include_linear: bool) -> bool:
    """Decompose at fit end; whether it was done."""
    if spawned(trainer):
        # ddp_spawn/ddp_fork hand only a dense-shaped state dict back to the main process
        # (loaded non-strictly): thin layers would be silently dropped there.
        rank_zero_warn("LRPET: decompose_on_fit_end is skipped under ddp_spawn/ddp_fork "
                       "(the main process only gets dense weights back); the weights are "
                       "exactly low rank: call decompose_(model) after fit")
        return False
    decomposed = decompose_(pl_module, ranks=ranks, include_linear=include_linear)
    rank_zero_info(f"LRPET: decomposed {len(decomposed)} layer(s) into thin pairs")
    return True


def _check_overlap(me: LowRankProjectionCallback, trainer: pl.Trainer,
                   layers: Sequence[TargetLayer]) -> None:
    """Refuse two LRPET callbacks projecting the same layer (each would fight the other's
    ranks, and the second decomposition would find the layer gone)."""
    mine = {id(layer.module): layer.name for layer in layers}
    shared = [mine[id(x.module)] for other in trainer.callbacks if other is not me
              and isinstance(other, LowRankProjectionCallback)
              for x in other._fit.layers if id(x.module) in mine]
    if shared:
        raise MisconfigurationException(
            f"two LowRankProjectionCallback instances target the same layers "
            f"({', '.join(shared[:4])}{', ...' if len(shared) > 4 else ''}); give them "
            "disjoint include/exclude patterns")
