"""The one planner every verb and the callback use: select the layers, trace them, solve
the ranks, and collect why each weight matrix left alone was left alone.

``select -> trace (BN pairs, reads of .weight outside the layer) -> ranks -> skip reasons``
is written here once, so ``project_low_rank_``, ``decompose_``, ``solve_ranks`` and
``LowRankProjectionCallback`` follow the same rules, and every name is relative to the
module the caller handed in.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.trace import Trace, attach_bn_pairs, trace_layers
from lrpet_lightning.core.walk import Selection, TargetLayer, select

__all__ = ["LayerPlan", "apply_trace", "merge_trace", "plan_layers", "select_plan", "set_ranks",
           "skip_message"]

#: Why a layer whose ``.weight`` its parent reads is left dense.
READ_OUTSIDE = "its .weight is read outside its own forward (by its parent's code)"


@dataclass
class LayerPlan:
    """The targeted layers (ranks set, BatchNorms attached) and the ones left alone."""

    layers: list[TargetLayer]
    #: ``{module name: reason}`` of every weight matrix that is not projected.
    skipped: dict[str, str] = field(default_factory=dict)
    #: Notes that do not skip a layer (e.g. BN rectification off for it), by layer.
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {layer.name: layer.rank for layer in self.layers}

    def warn(self, verb: str, stacklevel: int = 3) -> None:
        """One warning naming every layer left alone and why (nothing when none is)."""
        message = skip_message(verb, self.skipped, self.notes)
        if message:
            warnings.warn(message, UserWarning, stacklevel=stacklevel)


def skip_message(verb: str, skipped: Mapping[str, str], notes: Mapping[str, str] = {}) -> str:
    """The text of :meth:`LayerPlan.warn` ('' when there is nothing to say)."""
    parts = []
    if skipped:
        parts.append(f"{verb} leaves {len(skipped)} layer(s) with a weight matrix as they are:\n"
                     + "\n".join(f"  {name}: {reason}" for name, reason in skipped.items()))
    if notes:
        parts.append(f"{verb} notes:\n"
                     + "\n".join(f"  {name}: {note}" for name, note in notes.items()))
    return "\n".join(parts)


def apply_trace(plan: LayerPlan, trace: Trace, bn_rectification: bool,
                not_run_note: str | None = None) -> None:
    """Drop the layers whose weight is read outside their forward; attach BatchNorms.

    With ``not_run_note``, each layer the pass did not run gets that note (only when the
    trace saw layers run at all: a compiled model hides its calls from hooks).
    """
    for layer in plan.layers:
        if layer.name in trace.read_outside:
            plan.skipped[layer.name] = READ_OUTSIDE
    plan.layers = [layer for layer in plan.layers if layer.name not in trace.read_outside]
    if bn_rectification:
        attach_bn_pairs(plan.layers, trace.pairs)
        for layer in plan.layers:
            if layer.name in trace.ambiguous:
                plan.notes[layer.name] = (f"feeds several BatchNorms {trace.ambiguous[layer.name]}:"
                                          " no BN rectification")
    if not_run_note and trace.ran:
        for layer in plan.layers:
            if layer.name not in trace.ran:
                plan.notes[layer.name] = not_run_note


def merge_trace(plan: LayerPlan, trace: Trace, bn_rectification: bool,
                not_run_note: str | None = None) -> LayerPlan:
    """:func:`apply_trace` on a plan made earlier (e.g. traced during a training step):
    ``plan`` is updated, and what the trace added is returned as a plan of its own (the
    remaining layers, and only the new skipped layers and notes: to warn about them alone).
    """
    new = LayerPlan(plan.layers)
    apply_trace(new, trace, bn_rectification, not_run_note)
    plan.layers = new.layers
    plan.skipped.update(new.skipped)
    plan.notes.update(new.notes)
    return new


def plan_layers(
    model: nn.Module, config: LowRankConfig, example_inputs: Any = None, *,
    solve_budget: bool = True,
) -> LayerPlan:
    """Plan one verb on ``model``.

    - the layers ``config`` selects (for a budget: every targeted layer at full rank);
    - with ``example_inputs``: one eval-mode forward pass finds each conv's BatchNorm (when
      ``config.bn_rectification``) and the layers whose ``.weight`` is read outside their
      own forward (left dense, named in ``skipped``);
    - a budget's ranks, solved on the current weights (``solve_budget``).

    Raises:
        ValueError: a bad pattern, nothing targeted, or a budget that cannot be met.
    """
    plan = select_plan(model, config)
    if example_inputs is not None:
        apply_trace(plan, trace_layers(model, plan.layers, example_inputs),
                    config.bn_rectification)
    if config.budget is not None and solve_budget and plan.layers:
        from lrpet_lightning.core.budget import solve_ranks_for_layers

        solution = solve_ranks_for_layers(model, plan.layers, config, example_inputs)
        for layer in plan.layers:
            layer.rank = solution.ranks[layer.name]
    compressed = [layer for layer in plan.layers if layer.rank < layer.full_rank]
    if plan.layers and not compressed and config.budget is None:
        plan.notes["(all)"] = (f"every targeted layer keeps its full rank (min_rank="
                               f"{config.min_rank}, rank_ratio={config.rank_ratio}): "
                               "nothing is compressed")
    return plan


def select_plan(model: nn.Module, config: LowRankConfig) -> LayerPlan:
    """The layers ``config`` selects, not traced yet: their ranks, or for a budget every
    targeted layer at full rank (its ranks are solved later, see :func:`set_ranks`).

    Raises:
        ValueError: a bad pattern or nothing targeted.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
        >>> select_plan(model, LowRankConfig(rank_ratio=0.25)).ranks
        {'0': 4, '1': 4}
    """
    selection: Selection = select(model, _selection_config(config))
    return LayerPlan(selection.layers, dict(selection.skipped), dict(selection.notes))


def set_ranks(layers: Sequence[TargetLayer], ranks: Mapping[str, int],
              what: str = "the ranks") -> None:
    """Give each layer its rank from ``ranks`` (``{layer name: rank}``, e.g. a budget's
    ranks restored from a checkpoint), which must name exactly these layers.

    Raises:
        ValueError: ``ranks`` names other layers than ``layers`` (the message starts with
            ``what``).
    """
    names = [layer.name for layer in layers]
    if set(names) != set(ranks):
        raise ValueError(f"{what} name other layers than the targeted ones: "
                         f"{sorted(ranks)[:4]}... vs {names[:4]}...")
    for layer in layers:
        layer.rank = int(ranks[layer.name])


def _selection_config(config: LowRankConfig) -> LowRankConfig:
    if config.budget is None:
        return config
    from lrpet_lightning.core.budget import budget_selection

    return budget_selection(config)
