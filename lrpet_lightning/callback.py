"""``LowRankProjectionCallback``: LRPET for any LightningModule, a thin scheduler over the core."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lrpet_lightning.core.budget import RankSolution, budget_selection, solve_ranks_for_layers
from lrpet_lightning.core.checkpoint import atomic_write
from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.distributed import project_layers_distributed_
from lrpet_lightning.core.plan import LayerPlan, apply_trace, skip_message
from lrpet_lightning.core.report import CompressionReport, compression_report
from lrpet_lightning.core.trace import BNPairTracer
from lrpet_lightning.core.transforms import (
    LayerRecord,
    decompose_,
    decomposed_ranks,
    match_architecture_,
)
from lrpet_lightning.core.walk import Selection, TargetLayer, select

__all__ = ["LowRankProjectionCallback"]

# Strategies that shard parameters: no process holds a whole weight matrix to project.
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel")


def _check_schedule_int(name: str, value: Any, minimum: int, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, "
                         f"got {value!r}")


class LowRankProjectionCallback(Callback):
    r"""Train a low-rank network from scratch with LRPET (low-rank projection with energy transfer).

    SGD runs at full size; on schedule, every targeted weight matrix is projected onto rank
    ``r`` by truncated SVD, with energy transfer and BN rectification, written into the same
    Parameter objects (the optimizer and its momentum are untouched). At the end of fit a
    final projection makes the weights exactly low rank, and a compression report (FLOPs
    and parameters of the two-thin-layer model) is logged, printed and written to
    ``<trainer.log_dir>/compression_report.json``.

    - The layers are planned, and the BatchNorm following each conv is traced, during the
      first training step itself: no extra forward pass.
    - Epoch schedule: the projection runs on the epoch's last batch, before validation and
      checkpointing, so that epoch's metrics and checkpoints see the projected weights.
      Step schedule: right after an optimizer step (never on an accumulating batch).
      Override :meth:`should_project` for any other schedule.
    - Logged through the trainer's loggers: ``lrpet/projection_time_s``,
      ``lrpet/num_projections``, ``lrpet/mean_kept_energy``, ``lrpet/mean_relative_change``
      (and per layer with ``log_per_layer``), then ``lrpet/flops_reduction`` and
      ``lrpet/params_reduction`` at fit end.
    - FLOPs / parameter budgets instead of ``rank_ratio``: ``target_flops_reduction=0.8``
      (or ``target_params_reduction``) has the ranks solved so that the decomposed model
      has that much fewer FLOPs (parameters), within a fraction of a point above. With
      ``allocation="uniform"`` (one rank ratio; depends only on the layers' shapes) they
      are solved at the first projection. With ``allocation="spectrum"`` (per-layer ranks
      from the BN-rectified singular value spectra, keeping the most energy per FLOP in the
      product of the layers' kept fractions) the
      first ``budget_warmup_epochs`` epochs train at full rank without projection, and the
      ranks are solved at the first projection after them (or at fit end, if training
      ends sooner). Either way they are solved once, then frozen and checkpointed
      (``budget_ranks``), so a resumed run keeps them. FLOPs are counted on one sample of
      the first training batch.
    - Checkpointed state (one entry per ``state_key``, so several instances can coexist):
      the projection counters, ``ranks`` (``{layer: planned rank}``), ``budget_ranks``
      (the solved budget ranks, or None) and ``decomposed_ranks`` (the saved module's
      thin layers). To load a checkpoint saved
      after decomposition into a fresh dense model, rebuild first:
      ``decompose_(model, ranks=state["decomposed_ranks"]); model.load_state_dict(...)``.
    - Works with DDP, AMP and ``bf16-true`` (the SVD runs in float32), and with a model
      or network compiled by ``torch.compile``. FSDP, DeepSpeed and ModelParallel shard
      parameters and are refused in ``setup``.

    The maths keywords are those of :func:`lrpet_lightning.project_low_rank_`.

    Args:
        rank_ratio: kept fraction of each layer's full rank, in (0, 1].
        ranks: ``{module-name pattern: ratio (float) or rank (int)}`` overrides.
        energy_transfer, residual_scale, bn_rectification, include_linear, include,
            exclude, min_rank, svd_method: as in ``project_low_rank_``.
        target_flops_reduction: a FLOPs budget instead of ``rank_ratio`` (give
            ``rank_ratio=None``): the fraction of the model's FLOPs the decomposed model
            sheds, in (0, 1).
        target_params_reduction: the same for parameters (one budget at most).
        allocation: ``"uniform"`` or ``"spectrum"``: how the budget is shared by the layers
            (see :func:`lrpet_lightning.solve_ranks`). Ignored without a budget.
        budget_warmup_epochs: a ``"spectrum"`` budget is solved at the first projection
            after at least this many epochs of training at full rank, without projection
            (its ranks come from the trained weights). Default 1: at the end of the first
            epoch with the epoch schedule, at the first projection of the second epoch with
            the step schedule.
        every_n_epochs: project at the end of every n-th training epoch (CIFAR recipe: 1).
            Default 1 unless ``every_n_train_steps`` is given.
        every_n_train_steps: project after every n-th optimizer step, counted on
            ``trainer.global_step`` so gradient accumulation is right (ImageNet recipe: 250).
        start: no scheduled projection before this epoch (epoch schedule, 0-based) or
            optimizer step (step schedule) — a warm-up at full rank.
        stop: no scheduled projection from this epoch / step on (None: until the end).
        final_projection: project once more when training ends, so the trained model is
            exactly low rank. It truncates *without* energy transfer and with
            ``residual_scale=0``: energy transfer exists to keep gradients healthy *during*
            training; after the last step it would only rescale the weights against BN
            running statistics that can no longer adapt, while plain truncation is the
            closest rank-r model (Eckart-Young). Skipped when the last scheduled projection
            already ran after the last optimizer step with ``residual_scale=0``.
        decompose_on_fit_end: replace each projected layer by its two thin layers in place
            when training ends. Checkpoints saved before that (e.g. ``"best"``) hold dense
            weights; they still load into the decomposed module (each factorized layer
            splits a dense weight it is given), so ``trainer.test(ckpt_path="best")`` works.
        log_per_layer: also log each layer's kept energy and relative change.
        report: compute, print and save the compression report at fit end.

    Raises:
        ValueError, TypeError: a bad argument (named in the message), at construction.
        MisconfigurationException: in ``setup``, for a strategy that shards parameters.

    Example:
        >>> trainer = L.Trainer(callbacks=[LowRankProjectionCallback(rank_ratio=0.25)])
        >>> trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        rank_ratio: float | None = None,
        ranks: Mapping[str, float | int] | None = None,
        energy_transfer: bool = True,
        residual_scale: float = 0.0,
        bn_rectification: bool = True,
        include_linear: bool = False,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        min_rank: int = 1,
        svd_method: str = "gram",
        target_flops_reduction: float | None = None,
        target_params_reduction: float | None = None,
        allocation: str = "uniform",
        budget_warmup_epochs: int = 1,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        start: int = 0,
        stop: int | None = None,
        final_projection: bool = True,
        decompose_on_fit_end: bool = False,
        log_per_layer: bool = False,
        report: bool = True,
    ) -> None:
        super().__init__()
        self.config = LowRankConfig(
            rank_ratio=rank_ratio, ranks=ranks, energy_transfer=energy_transfer,
            residual_scale=residual_scale, bn_rectification=bn_rectification,
            include_linear=include_linear, include=include, exclude=exclude,
            min_rank=min_rank, svd_method=svd_method,
            target_flops_reduction=target_flops_reduction,
            target_params_reduction=target_params_reduction, allocation=allocation,
        )
        _check_schedule_int("budget_warmup_epochs", budget_warmup_epochs, 0, optional=False)
        if every_n_epochs is not None and every_n_train_steps is not None:
            raise ValueError(
                f"every_n_epochs={every_n_epochs!r} and every_n_train_steps="
                f"{every_n_train_steps!r} are both set; choose one schedule"
            )
        _check_schedule_int("every_n_epochs", every_n_epochs, 1)
        _check_schedule_int("every_n_train_steps", every_n_train_steps, 1)
        _check_schedule_int("start", start, 0, optional=False)
        _check_schedule_int("stop", stop, 1)
        if stop is not None and stop <= start:
            raise ValueError(f"stop must be greater than start={start}, got {stop!r}")
        for flag, value in (("final_projection", final_projection),
                            ("decompose_on_fit_end", decompose_on_fit_end),
                            ("log_per_layer", log_per_layer), ("report", report)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        self.budget_warmup_epochs = budget_warmup_epochs
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs or (None if every_n_train_steps else 1)
        self.start, self.stop = start, stop
        self.final_projection = final_projection
        self.decompose_on_fit_end = decompose_on_fit_end
        self.log_per_layer = log_per_layer
        self.report = report

        # Run-time state; the counters are saved in checkpoints.
        self.num_projections = 0
        self.last_projected_step = -1
        self.last_projected_epoch = -1
        self.last_records: list[LayerRecord] = []
        #: The records of this fit's first projection (not checkpointed: a diagnostic).
        self.first_records: list[LayerRecord] = []
        self.compression: CompressionReport | None = None
        self._layers: list[TargetLayer] | None = None
        # {layer name: rank} of the plan; outlives the plan's modules (decomposition).
        self._ranks: dict[str, int] = {}
        # A budget's solved ranks (None until solved); frozen once solved, checkpointed.
        self._budget_ranks: dict[str, int] | None = None
        #: What the budget solver found (this process only; the ranks are checkpointed).
        self.budget_solution: RankSolution | None = None
        self._tracer: BNPairTracer | None = None
        self._example_inputs: Any = None
        self._input_hook: Any = None
        self._hooked: nn.Module | None = None  # the module whose loads match checkpoints
        self._step_at_batch_start = -1
        self._traced = False
        self._projected_this_epoch = False
        # True while the weights are exactly low rank: projected with residual_scale=0 and
        # no optimizer step since. Per fit, so a callback reused by a new Trainer is right.
        self._exact = False

    # ------------------------------------------------------------------ identity / state
    @property
    @override
    def state_key(self) -> str:
        # The budget's keys only when there is one: older checkpoints keep their key.
        budget = {} if self.config.budget is None else {
            f"target_{self.config.budget[0]}_reduction": self.config.budget[1],
            "allocation": self.config.allocation,
        }
        return self._generate_state_key(
            rank_ratio=self.config.rank_ratio, ranks=self.config.ranks,
            include=self.config.include, exclude=self.config.exclude,
            every_n_epochs=self.every_n_epochs, every_n_train_steps=self.every_n_train_steps,
            **budget,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_projections": self.num_projections,
            "last_projected_step": self.last_projected_step,
            "last_projected_epoch": self.last_projected_epoch,
            # The planned rank of every projected layer, by module name.
            "ranks": dict(self._ranks),
            # A budget's ranks once solved (None before): a resumed run keeps them.
            "budget_ranks": None if self._budget_ranks is None else dict(self._budget_ranks),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_projections = state_dict["num_projections"]
        self.last_projected_step = state_dict["last_projected_step"]
        self.last_projected_epoch = state_dict["last_projected_epoch"]
        self._ranks = dict(state_dict.get("ranks", {}))
        budget_ranks = state_dict.get("budget_ranks")
        self._budget_ranks = None if budget_ranks is None else dict(budget_ranks)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # The saved module's thin layers, read off the module itself (not restored state: a
        # dense "best" checkpoint loaded into the decomposed module leaves it decomposed).
        # Rebuild before loading: decompose_(model, ranks=...); model.load_state_dict(...).
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        decomposed = decomposed_ranks(pl_module)
        if state is not None:
            state["decomposed_ranks"] = decomposed
        if decomposed and checkpoint.get("optimizer_states"):
            # Saved after decompose_on_fit_end (ModelCheckpoint's on_train_end runs after
            # ours): the optimizers still hold the dense parameters, which the module no
            # longer has. Their state would not load into the thin model's optimizers.
            live = {id(p) for p in pl_module.parameters()}
            if any(id(p) not in live for opt in trainer.optimizers
                   for group in opt.param_groups for p in group["params"]):
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
            pl_module.register_load_state_dict_pre_hook(_match_checkpoint)
            self._hooked = pl_module
        if stage != "fit":
            return  # the rest only acts while fitting
        # Plan afresh in every fit: this one may train another model. (A resumed fit gets
        # its budget ranks back from the checkpoint, which is restored after setup.)
        self._layers, self._example_inputs, self._exact = None, None, False
        self._budget_ranks, self.budget_solution = None, None
        self.first_records = []
        # Match on the class hierarchy's names so subclasses of these strategies are refused
        # too, without importing optional backends (deepspeed) just to check.
        names = [cls.__name__ for cls in type(trainer.strategy).__mro__]
        if any(s in n for n in names for s in _UNSUPPORTED_STRATEGIES):
            raise MisconfigurationException(
                f"LowRankProjectionCallback does not support the {names[0]} strategy: it "
                "shards parameters, so no process holds a whole weight matrix to project. Use "
                "strategy='ddp' (or 'ddp_spawn', or a single device)."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Plan here, after configure_model and before the first step, so that a pattern
        # that matches nothing fails before any training time is spent.
        config = self.config if self.config.budget is None else budget_selection(self.config)
        try:
            # (for a budget: every targeted layer at full rank until the budget is solved)
            selection = select(pl_module, config)
        except ValueError:
            if not decomposed_ranks(pl_module):
                raise
            # A relaunch of a run that was decomposed at fit end (the checkpoint holds thin
            # layers): they are rank r by construction, and nothing is left to project.
            selection = Selection([])
            rank_zero_info("LRPET: the model is already decomposed into thin layers; "
                           "nothing is left to project")
        self._check_overlap(trainer, selection.layers)
        self._layers = selection.layers
        if selection.skipped:
            rank_zero_warn("LRPET: " + skip_message("LowRankProjectionCallback",
                                                     selection.skipped))
        if self.config.budget is not None and self._budget_ranks is not None and self._layers:
            self._apply_budget_ranks(self._budget_ranks)  # restored from a checkpoint: frozen
        self._ranks = ({} if self.config.budget is not None and self._budget_ranks is None
                       else {layer.name: layer.rank for layer in self._layers})
        self._traced = not self._layers  # nothing to trace when nothing is planned
        n = len(self._layers)
        rank_zero_info(f"LRPET: projecting {n} layer(s) "
                       + (f"every {self.every_n_train_steps} optimizer step(s)"
                          if self.every_n_train_steps else f"every {self.every_n_epochs} epoch(s)"))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step
        if self._traced or self._layers is None:
            return
        # Trace conv->BN pairs during this very training step: no extra forward pass.
        self._traced = True
        # The tracer also finds layers whose .weight their parent reads (kept dense).
        self._tracer = BNPairTracer(pl_module, self._layers).__enter__()
        counts_flops = self.config.budget is not None and self.config.budget[0] == "flops"
        if (self.report or counts_flops) and self._example_inputs is None:
            root = self._report_root(pl_module)
            self._input_hook = root.register_forward_pre_hook(self._capture_inputs,
                                                              with_kwargs=True)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._finish_tracing(pl_module)
        step, epoch = trainer.global_step, trainer.current_epoch
        # Under gradient accumulation most batches do not step the optimizer, and
        # global_step stays put (at 0 before the first step).
        stepped = step != self._step_at_batch_start
        if stepped:
            self._exact = False
        if self.every_n_train_steps is not None:
            # Right after a step, once, if a scheduled step was reached or crossed (several
            # optimizers in manual optimization advance global_step by more than one).
            if stepped and any(self.should_project(t, epoch)
                               for t in range(self._step_at_batch_start + 1, step + 1)):
                self._project(trainer, pl_module)
        elif trainer.is_last_batch:
            # Project on the epoch's last batch, before validation and checkpointing run,
            # so that this epoch's metrics and checkpoints see the projected weights.
            self._maybe_project_epoch(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._projected_this_epoch = False

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fallback for loaders of unknown length, where no batch was flagged as last.
        if self.every_n_train_steps is None:
            self._maybe_project_epoch(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._remove_hooks()  # a fit that failed in its first step left them behind

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_tracing(pl_module)
        if not self._layers or not self._traced:  # no training step ran, or nothing planned
            return
        if self.config.budget is not None and self._budget_ranks is None:
            self._solve_budget(trainer, pl_module)  # training ended within the warm-up
        if self.final_projection and not self._exact:
            final = dataclasses.replace(self.config, energy_transfer=False, residual_scale=0.0)
            self._project(trainer, pl_module, config=final, final=True)
        if self.report:
            self._write_report(trainer, pl_module)
        if self.decompose_on_fit_end and _spawned(trainer):
            # ddp_spawn/ddp_fork hand only a dense-shaped state dict back to the main process
            # (loaded non-strictly): thin layers would be silently dropped there.
            rank_zero_warn("LRPET: decompose_on_fit_end is skipped under ddp_spawn/ddp_fork "
                           "(the main process only gets dense weights back); the weights are "
                           "exactly low rank: call decompose_(model) after fit")
        elif self.decompose_on_fit_end:
            decomposed = decompose_(pl_module, ranks=self._ranks,
                                    include_linear=self.config.include_linear)
            self._layers = None  # the planned modules were replaced
            rank_zero_info(f"LRPET: decomposed {len(decomposed)} layer(s) into thin pairs")

    # ------------------------------------------------------------------------ internals
    def _check_overlap(self, trainer: pl.Trainer, layers: Sequence[TargetLayer]) -> None:
        """Refuse two LRPET callbacks projecting the same layer (each would fight the other's
        ranks, and the second decomposition would find the layer gone)."""
        mine = {id(layer.module): layer.name for layer in layers}
        for other in trainer.callbacks:
            if other is self or not isinstance(other, LowRankProjectionCallback):
                continue
            shared = [mine[id(layer.module)] for layer in other._layers or []
                      if id(layer.module) in mine]
            if shared:
                raise MisconfigurationException(
                    f"two LowRankProjectionCallback instances target the same layers "
                    f"({', '.join(shared[:4])}{', ...' if len(shared) > 4 else ''}); give them "
                    "disjoint include/exclude patterns"
                )

    def _maybe_project_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._projected_this_epoch and self.should_project(trainer.global_step,
                                                                  trainer.current_epoch):
            self._project(trainer, pl_module)
            self._projected_this_epoch = True

    def _remove_input_hook(self) -> None:
        if self._input_hook is not None:
            self._input_hook.remove()
            self._input_hook = None

    def _remove_hooks(self) -> None:
        self._remove_input_hook()
        if self._tracer is not None:
            self._tracer.__exit__()
            self._tracer = None

    def _finish_tracing(self, pl_module: pl.LightningModule) -> None:
        self._remove_input_hook()
        if self._tracer is None:
            return
        self._tracer.__exit__()
        trace = self._tracer.trace()
        self._tracer = None
        plan = LayerPlan(self._layers or [])
        apply_trace(plan, trace, self.config.bn_rectification)
        if trace.ran:  # hooks fire (not a compiled model): name the layers that did not run
            for layer in plan.layers:
                if layer.name not in trace.ran:
                    plan.notes[layer.name] = ("did not run in the first training step: no BN "
                                              "rectification for it")
        self._layers = plan.layers
        self._ranks = {n: r for n, r in self._ranks.items() if n not in plan.skipped}
        message = skip_message("LowRankProjectionCallback", plan.skipped, plan.notes)
        if message:
            rank_zero_warn("LRPET: " + message)
        if not trace.pairs and any(isinstance(m, _BatchNorm) for m in pl_module.modules()):
            rank_zero_warn("LRPET: no conv feeds a BatchNorm directly in the first training "
                           "step (a compiled model hides its data flow from hooks); BN "
                           "rectification is off. Set bn_rectification=False to silence this.")

    def _capture_inputs(self, module: nn.Module, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> None:
        # One sample of the model's input, for counting FLOPs at fit end.
        self._remove_input_hook()
        args, kwargs = _first_sample(args), _first_sample(kwargs)
        if kwargs and args:
            rank_zero_warn("LRPET: the model takes positional and keyword inputs; the "
                           "compression report only replays one kind and is skipped")
            return
        self._example_inputs = kwargs or args

    def _budget_pending(self, trainer: pl.Trainer) -> bool:
        """Whether a spectrum budget is still in its warm-up (no projection yet)."""
        if self.config.budget is None or self._budget_ranks is not None:
            return False
        if self.config.allocation != "spectrum":
            return False
        # An epoch-end projection comes after the epoch; a step one within it.
        done = trainer.current_epoch + (1 if self.every_n_train_steps is None else 0)
        return done < self.budget_warmup_epochs

    def _apply_budget_ranks(self, ranks: Mapping[str, int]) -> None:
        layers = self._layers or []
        if {layer.name for layer in layers} != set(ranks):
            raise ValueError(
                "LRPET: the budget ranks restored from the checkpoint name other layers than "
                f"this model's targeted ones: {sorted(ranks)[:4]}... vs "
                f"{[layer.name for layer in layers][:4]}..."
            )
        for layer in layers:
            layer.rank = int(ranks[layer.name])

    def _solve_budget(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Solve the budget once, on the current weights, and freeze the ranks."""
        root, prefix = self._network(pl_module)
        strip = len(prefix) + 1 if prefix else 0
        # The live layers (their weights and traced BatchNorms), named relative to the
        # network; FLOPs are counted on a copy (the live forward may have side effects).
        layers = [dataclasses.replace(layer, name=layer.name[strip:])
                  for layer in self._layers or []]
        self.budget_solution = solve_ranks_for_layers(
            copy.deepcopy(root), layers, self.config, self._example_inputs)
        ranks = {prefix + "." + n if prefix else n: r
                 for n, r in self.budget_solution.ranks.items()}
        # One decision for every replica, whatever their SVD round-off.
        self._budget_ranks = dict(trainer.strategy.broadcast(ranks, src=0))
        self._apply_budget_ranks(self._budget_ranks)
        self._ranks = dict(self._budget_ranks)
        rank_zero_info(f"LRPET budget solved (epoch {trainer.current_epoch}, step "
                       f"{trainer.global_step}), ranks now frozen: "
                       f"{self.budget_solution.summary()}")

    def _project(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 config: LowRankConfig | None = None, final: bool = False) -> None:
        if self.config.budget is not None and self._budget_ranks is None:
            if not final and self._budget_pending(trainer):
                return  # warm-up at full rank: the spectra are not worth reading yet
            self._solve_budget(trainer, pl_module)
        config = config or self.config
        t0 = time.perf_counter()
        # Under DDP each layer is projected once, by one rank, and broadcast: the replicas
        # stay bitwise identical and the SVD work is shared (a plain call otherwise).
        records = project_layers_distributed_(self._layers or [], config)
        seconds = time.perf_counter() - t0
        # Exactly low rank only if no layer failed (a transient SVD failure at the last
        # scheduled projection must not skip the final one).
        self._exact = config.residual_scale == 0.0 and all(
            r.skipped in (None, "rank >= full rank", "all-zero layer") for r in records)
        self.last_records = records
        self.first_records = self.first_records or records
        self.num_projections += 1
        self.last_projected_step = trainer.global_step
        self.last_projected_epoch = trainer.current_epoch
        done = [r for r in records if r.skipped is None]
        metrics = {
            "lrpet/projection_time_s": seconds,
            "lrpet/num_projections": float(self.num_projections),
            "lrpet/mean_kept_energy": sum(r.kept_energy for r in done) / max(len(done), 1),
            "lrpet/mean_relative_change": (sum(r.relative_change for r in done)
                                           / max(len(done), 1)),
        }
        if self.log_per_layer:
            for r in done:
                metrics[f"lrpet/kept_energy/{r.name}"] = r.kept_energy
                metrics[f"lrpet/relative_change/{r.name}"] = r.relative_change
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if final:
            rank_zero_info(f"LRPET: final projection of {len(done)} layer(s) in {seconds:.2f} s")

    def _report_root(self, pl_module: pl.LightningModule) -> nn.Module:
        """The network whose input the report counts FLOPs on: the LightningModule's child
        holding every targeted layer (``self.model``, ``self.net``...), else the module."""
        names = self._ranks or [layer.name for layer in self._layers or []]
        heads = {name.split(".")[0] for name in names}
        if len(heads) == 1:
            child = pl_module.get_submodule(heads.pop())
            if not any(layer.module is child for layer in self._layers or []):
                return child
        return pl_module

    def _network(self, pl_module: pl.LightningModule) -> tuple[nn.Module, str]:
        """The network FLOPs are counted on, and its qualified name in ``pl_module``."""
        root = self._report_root(pl_module)
        # A torch.compile'd net: count FLOPs on the eager module it wraps (no recompiling).
        root = getattr(root, "_orig_mod", root)
        return root, next(n for n, m in pl_module.named_modules() if m is root)

    def _compression_report(self, pl_module: pl.LightningModule) -> CompressionReport:
        root, prefix = self._network(pl_module)
        strip = len(prefix) + 1 if prefix else 0
        ranks = {name[strip:]: rank for name, rank in self._ranks.items()}
        # Count on copies: running the live model would fire its hooks and whatever side
        # effects its forward has, after training.
        dense = copy.deepcopy(root)
        compact = copy.deepcopy(root)
        with warnings.catch_warnings():  # the notes of decompose_ belong to the real one
            warnings.simplefilter("ignore")
            decompose_(compact, ranks=ranks, include_linear=self.config.include_linear)
        report = compression_report(dense, compact, self._example_inputs)
        if not prefix:
            return report
        # One name per layer: the rows carry the names the callback uses everywhere else
        # (records, checkpointed ranks, the ranks/include/exclude patterns).
        return dataclasses.replace(
            report, layers=[dataclasses.replace(row, name=f"{prefix}.{row.name}")
                            for row in report.layers],
            uncounted={f"{prefix}.{n}" if n else prefix: p for n, p in report.uncounted.items()})

    def _write_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective: on every rank
        if self._example_inputs is None:
            rank_zero_warn("LRPET: no model input was seen during training; the compression "
                           "report is skipped")
            return
        try:
            self.compression = self._compression_report(pl_module)
        except Exception as err:  # noqa: BLE001 - a report must not fail a finished training
            rank_zero_warn(f"LRPET: the compression report failed and is skipped: "
                           f"{type(err).__name__}: {err}")
            return
        if trainer.is_global_zero:
            rank_zero_info("LRPET compression report:\n" + self.compression.format_table())
            path = os.path.join(log_dir, "compression_report.json")
            try:
                with atomic_write(path) as f:
                    json.dump(self.compression.to_dict(), f, indent=2)
            except OSError as err:  # a read-only log dir must not lose the decomposition
                rank_zero_warn(f"LRPET: the compression report could not be written to {path}:"
                               f" {type(err).__name__}: {err}")
        for logger in trainer.loggers:
            logger.log_metrics({"lrpet/flops_reduction": self.compression.flops_reduction,
                                "lrpet/params_reduction": self.compression.params_reduction},
                               step=trainer.global_step)


def _spawned(trainer: pl.Trainer) -> bool:
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def _match_checkpoint(module: nn.Module, state_dict: Mapping[str, Any], prefix: str,
                      *args: Any) -> None:
    decomposed = match_architecture_(module, state_dict, prefix)
    if decomposed:
        rank_zero_info(f"LRPET: decomposed {len(decomposed)} layer(s) to load a checkpoint "
                       "of a decomposed model")


def _first_sample(inputs: Any) -> Any:
    """The first sample of a batch (``t[:1]`` of every tensor, detached), in the same nesting."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1].detach().clone() if inputs.dim() > 0 else inputs.detach().clone()
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_first_sample(x) for x in inputs)
    if isinstance(inputs, Mapping):
        return {k: _first_sample(v) for k, v in inputs.items()}
    return inputs
