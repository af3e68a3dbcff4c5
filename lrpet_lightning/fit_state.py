"""The state of one fit of :class:`~lrpet_lightning.LowRankProjectionCallback`: the plan,
the ranks, the first step's tracing, a budget's solution. Plain PyTorch (no Lightning):
the callback decides when; this object holds what one fit planned and saw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lrpet_lightning.core.batchnorm import RecentInputs
from lrpet_lightning.core.budget import (
    RankSolution,
    budget_costs,
    check_reachable,
    solve_ranks_for_layers,
)
from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.network import Network
from lrpet_lightning.core.plan import (
    LayerPlan,
    merge_trace,
    select_plan,
    set_ranks,
    skip_message,
)
from lrpet_lightning.core.report import CompressionReport, rank_report
from lrpet_lightning.core.trace import BNPairTracer, InputRecorder
from lrpet_lightning.core.transforms import LayerRecord, decomposed_ranks
from lrpet_lightning.core.walk import TargetLayer, copy_model

__all__ = ["FitState"]


@dataclass
class FitState:
    """What one fit plans and sees. Made afresh in ``setup`` for every fit: one callback may
    serve several Trainers and models. ``ranks`` and ``budget_ranks`` are checkpointed."""

    #: The targeted layers (ranks set, BatchNorms attached once traced); None before
    #: planning and after decomposition (the planned modules are gone).
    plan: LayerPlan | None = None
    #: ``{layer: rank}`` the layers are projected at (empty while a budget is unsolved).
    ranks: dict[str, int] = field(default_factory=dict)
    #: A budget's solved ranks (None until solved), frozen once solved.
    budget_ranks: dict[str, int] | None = None
    budget_solution: RankSolution | None = None
    first_records: list[LayerRecord] = field(default_factory=list)
    tracer: BNPairTracer | None = None  # live during the first training step only
    inputs: InputRecorder | None = None  # one sample of the network's input
    #: The network's last training inputs, for bn_recalibration (None: off).
    recent: RecentInputs | None = None
    traced: bool = False
    step_at_batch_start: int = -1
    projected_this_epoch: bool = False
    #: True while the weights are exactly low rank: projected with residual_scale=0 and no
    #: optimizer step since.
    exact: bool = False
    #: Whether :meth:`check_budget` checked that the budget can be met.
    budget_checked: bool = False

    @property
    def layers(self) -> list[TargetLayer]:
        return [] if self.plan is None else self.plan.layers

    @property
    def example_inputs(self) -> Any:
        return None if self.inputs is None else self.inputs.inputs

    def plan_for(self, model: nn.Module, config: LowRankConfig) -> list[tuple[bool, str]]:
        """Plan the layers of ``model`` (every one at full rank while a budget is unsolved;
        a budget restored from a checkpoint is frozen); the messages to give, each with
        whether it is only information (else a warning)."""
        messages: list[tuple[bool, str]] = []
        try:
            self.plan = select_plan(model, config)
        except ValueError:
            if not decomposed_ranks(model):
                raise
            # A relaunch of a run that was decomposed at fit end (the checkpoint holds thin
            # layers): they are rank r by construction, and nothing is left to project.
            self.plan = LayerPlan([])
            messages.append((True, "the model is already decomposed into thin layers; "
                                   "nothing is left to project"))
        if self.plan.skipped or self.plan.notes:
            messages.append((False, skip_message("LowRankProjectionCallback",
                                                 self.plan.skipped, self.plan.notes)))
        if config.budget is not None and self.budget_ranks is not None and self.layers:
            set_ranks(self.layers, self.budget_ranks,
                      "LRPET: the budget ranks restored from the checkpoint")
        unsolved = config.budget is not None and self.budget_ranks is None
        self.ranks = {} if unsolved else self.plan.ranks
        self.traced = not self.layers  # nothing to trace when nothing is planned
        return messages

    def start_tracing(self, model: nn.Module, inputs_of: nn.Module | None) -> None:
        """Hook the first training step: BN pairs and outside reads of the planned layers
        (``model``'s), and the input of ``inputs_of`` (when given)."""
        self.traced = True
        self.tracer = BNPairTracer(model, self.layers).__enter__()
        if inputs_of is not None and self.inputs is None:
            self.inputs = InputRecorder(inputs_of).__enter__()

    def finish_tracing(self, model: nn.Module, bn_rectification: bool) -> list[str]:
        """Unhook, and apply the trace to the plan; the warnings to give (once per fit)."""
        if self.inputs is not None:
            self.inputs.__exit__()  # it removes itself once it ran; this is for a step that did not
        if self.tracer is None or self.plan is None:
            return []
        self.tracer.__exit__()
        trace, self.tracer = self.tracer.trace(), None
        traced = merge_trace(self.plan, trace, bn_rectification, not_run_note=(
            "did not run in the first training step: no BN rectification for it"))
        self.ranks = {n: r for n, r in self.ranks.items() if n not in traced.skipped}
        messages = [skip_message("LowRankProjectionCallback", traced.skipped, traced.notes)]
        if (bn_rectification and not trace.pairs
                and any(isinstance(m, _BatchNorm) for m in model.modules())):
            why = ("each BatchNorm follows another op or a layer left alone" if trace.ran
                   else "no projected layer's hook ran: a compiled model hides its data flow "
                        "from hooks")
            messages.append(f"no projected conv feeds a BatchNorm directly in the first "
                            f"training step ({why}); BN rectification is off. Set "
                            "bn_rectification=False to silence this.")
        if self.inputs is not None and self.inputs.problem:
            messages.append(f"{self.inputs.problem}; the compression report is skipped")
        return [m for m in messages if m]

    def keep_recent_inputs(self, network: nn.Module, batches: int) -> None:
        """From now on keep the inputs of ``network``'s last ``batches`` training calls."""
        self.recent = RecentInputs(network, batches).__enter__()

    def remove_hooks(self) -> None:
        for hooks in (self.inputs, self.tracer, self.recent):
            if hooks is not None:
                hooks.__exit__()
        self.tracer = self.recent = None

    def budget_pending(self, config: LowRankConfig, epochs_done: int, warmup_epochs: int) -> bool:
        """Whether a ``"spectrum"`` budget is still in its warm-up (no projection yet)."""
        return (config.budget is not None and self.budget_ranks is None
                and config.allocation == "spectrum" and epochs_done < warmup_epochs)

    def check_budget(self, network: Network, config: LowRankConfig) -> None:
        """Raise ``ValueError`` now if ``config``'s budget, still unsolved, cannot be met:
        a parameter budget from the shapes alone (before the first step), a FLOPs budget
        once one input was recorded (after it). Not hours later, when it is solved."""
        if (config.budget is None or self.budget_ranks is not None or not self.layers
                or self.budget_checked):
            return
        flops = config.budget[0] == "flops"
        if flops and self.example_inputs is None:
            return
        self.budget_checked = True
        model = copy_model(network.eager) if flops else network.eager  # the count runs it
        layers = network.local_layers(self.layers)
        check_reachable(model, budget_costs(model, layers, self.example_inputs if flops
                                            else None), config)

    def solve_budget(self, network: Network, config: LowRankConfig,
                     broadcast: Callable[[dict[str, int]], dict[str, int]]) -> RankSolution:
        """Solve the budget once, on the current weights, and freeze the ranks.

        FLOPs are counted on a copy of the network (the live forward may have side effects);
        ``broadcast`` makes one decision for every replica, whatever their SVD round-off.
        """
        self.budget_solution = solve_ranks_for_layers(
            copy_model(network.eager), network.local_layers(self.layers), config,
            self.example_inputs)
        self.budget_ranks = dict(broadcast(network.qualified(self.budget_solution.ranks)))
        set_ranks(self.layers, self.budget_ranks, "LRPET: the broadcast budget ranks")
        self.ranks = dict(self.budget_ranks)
        return self.budget_solution

    def report(self, network: Network, include_linear: bool) -> CompressionReport:
        """The compression report at the planned ranks, counted on copies of ``network``
        and named as the records are (LightningModule-relative)."""
        return rank_report(network.eager, network.local(self.ranks), self.example_inputs,
                           include_linear=include_linear).qualified(network.prefix)
