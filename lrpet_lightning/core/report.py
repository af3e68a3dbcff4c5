"""FLOPs and parameters before/after compression, counted by ``torch.utils.flop_counter``."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from lrpet_lightning.core.factorized import FactorizedLayer
from lrpet_lightning.core.trace import eval_mode, run_forward
from lrpet_lightning.core.walk import CONV_TYPES, copy_model, full_rank_of, is_hf_conv1d

if TYPE_CHECKING:
    from lrpet_lightning.core.transforms import LayerRecord

__all__ = ["CompressionReport", "LayerCost", "compression_report", "count_flops",
           "projection_summary", "rank_report", "uncounted_modules"]


@dataclass(frozen=True)
class LayerCost:
    """FLOPs and parameters of one Conv/Linear layer of the dense model, before and after."""

    name: str
    kind: str
    dense_flops: int
    compact_flops: int
    dense_params: int
    compact_params: int
    full_rank: int
    #: Rank of the factorized layer, or None when the layer stayed dense.
    rank: int | None


@dataclass(frozen=True)
class CompressionReport:
    """Totals and per-layer costs; FLOPs as ``torch.utils.flop_counter`` counts them
    (2 per multiply-accumulate), so reductions equal the reference code's MAC-based ones."""

    dense_flops: int
    compact_flops: int
    dense_params: int
    compact_params: int
    layers: list[LayerCost] = field(default_factory=list)
    #: ``{module: parameters}`` of the modules whose FLOPs could not be counted (no formula
    #: in ``torch.utils.flop_counter``): the FLOPs totals leave them out.
    uncounted: dict[str, int] = field(default_factory=dict)

    @property
    def flops_fully_counted(self) -> bool:
        """False when some module's FLOPs could not be counted (see ``uncounted``)."""
        return not self.uncounted

    def uncounted_note(self) -> str:
        """What the FLOPs totals leave out ('' when nothing)."""
        if not self.uncounted:
            return ""
        share = sum(self.uncounted.values()) / max(self.dense_params, 1)
        names = ", ".join(f"{n or '(model)'} ({_human(p)} params)"
                          for n, p in list(self.uncounted.items())[:6])
        more = f" and {len(self.uncounted) - 6} more" if len(self.uncounted) > 6 else ""
        return (f"the FLOPs of {len(self.uncounted)} module(s) holding {100 * share:.1f} % of "
                f"the parameters could not be counted (no FLOPs formula for their ops): "
                f"{names}{more}; the FLOPs figures cover the counted part only")

    @property
    def flops_reduction(self) -> float:
        """Fraction of FLOPs removed, e.g. ``0.791`` for 79.1 % fewer FLOPs."""
        return 1.0 - self.compact_flops / self.dense_flops if self.dense_flops else 0.0

    @property
    def params_reduction(self) -> float:
        """Fraction of parameters removed."""
        return 1.0 - self.compact_params / self.dense_params if self.dense_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (totals, reductions and the per-layer rows)."""
        out = asdict(self)
        out["flops_reduction"] = self.flops_reduction
        out["flops_fully_counted"] = self.flops_fully_counted
        out["params_reduction"] = self.params_reduction
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as indented JSON to ``path`` (atomically: an interrupted
        write never leaves a truncated file) and return the path."""
        from lrpet_lightning.core.checkpoint import atomic_write

        with atomic_write(path) as f:
            json.dump(self.to_dict(), f, indent=2)
        return Path(path)

    def qualified(self, prefix: str) -> CompressionReport:
        """The same report with every module name put under ``prefix`` (a report counted on
        a network named as the layers of the module that holds it: ``conv1`` -> ``net.conv1``).
        """
        if not prefix:
            return self
        return replace(
            self, layers=[replace(row, name=f"{prefix}.{row.name}") for row in self.layers],
            uncounted={f"{prefix}.{n}" if n else prefix: p for n, p in self.uncounted.items()})

    def _rows(self) -> list[list[str]]:
        rows = []
        for c in self.layers:
            rank = f"{c.rank}/{c.full_rank}" if c.rank is not None else f"dense/{c.full_rank}"
            rows.append([c.name, c.kind, rank, _human(c.dense_flops), _human(c.compact_flops),
                         _human(c.dense_params), _human(c.compact_params)])
        rows.append(["total", "", "", _human(self.dense_flops), _human(self.compact_flops),
                     _human(self.dense_params), _human(self.compact_params)])
        return rows

    _HEADER = ("layer", "type", "rank", "FLOPs before", "FLOPs after", "params before",
               "params after")

    def summary(self) -> str:
        counted = "" if self.flops_fully_counted else " counted"
        text = (f"FLOPs{counted} {_human(self.dense_flops)} -> {_human(self.compact_flops)} "
                f"({100 * self.flops_reduction:.1f} % fewer), params "
                f"{_human(self.dense_params)} -> {_human(self.compact_params)} "
                f"({100 * self.params_reduction:.1f} % fewer)")
        return text + (f"\nNote: {self.uncounted_note()}" if self.uncounted else "")

    def format_table(self) -> str:
        """A fixed-width text table with one row per layer and the totals, then a summary."""
        rows = [self._HEADER, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._HEADER))]
        lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                 for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([*lines, self.summary()])

    def to_markdown(self) -> str:
        """The same table in Markdown."""
        rows = [list(self._HEADER), ["---"] * 3 + ["---:"] * 4, *self._rows()]
        return "\n".join("| " + " | ".join(r) + " |" for r in rows) + f"\n\n{self.summary()}\n"

    def __str__(self) -> str:
        return self.format_table()


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def count_flops(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """FLOPs per module name (``""`` is the whole model) of one eval-mode forward pass."""
    return _count(model, example_inputs)[0]


def _count(model: nn.Module, example_inputs: Any) -> tuple[dict[str, int], set[str]]:
    """FLOPs per module name, and the names of the modules that ran."""
    ran: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda *_, n=name: ran.add(n))
               for name, m in model.named_modules()]
    try:
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            run_forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    root = type(model).__name__
    flops = {"": counter.get_total_flops()}
    for key, per_op in counter.get_flop_counts().items():
        if key.startswith(root + "."):
            flops[key[len(root) + 1:]] = sum(per_op.values())
    return flops, ran


def uncounted_modules(model: nn.Module, flops: dict[str, int], ran: set[str]) -> dict[str, int]:
    """``{name: parameters}`` of the modules that ran, hold a weight matrix of their own and
    were counted 0 FLOPs: ``torch.utils.flop_counter`` has no formula for their ops (CPU
    LSTM/GRU kernels, fused attention fast paths). Embeddings are lookups, not FLOPs; a
    parametrization's ``ParametrizationList`` (``weight_norm``...) holds the raw tensor of a
    weight its owner uses, whose FLOPs the owner's count holds."""
    out = {}
    for name, module in model.named_modules():
        if name not in ran or flops.get(name, 0) or isinstance(module, (
                nn.Embedding, nn.EmbeddingBag, parametrize.ParametrizationList)):
            continue
        own = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
        if own and not any(name.startswith(u + ".") for u in out):
            out[name] = sum(p.numel() for p in module.parameters())
    return out


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def compression_report(
    dense_model: nn.Module, compact_model: nn.Module, example_inputs: Any
) -> CompressionReport:
    """Compare a dense model and its compact (decomposed) version on ``example_inputs``.

    FLOPs come from one eval-mode forward pass of each model under
    ``torch.utils.flop_counter.FlopCounterMode``; rows are the dense model's Conv and
    Linear layers, matched by qualified name in the compact model.

    Example:
        >>> from lrpet_lightning.core.transforms import decompose_
        >>> model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 32, 3))
        >>> import copy
        >>> dense = copy.deepcopy(model); _ = decompose_(model, rank_ratio=0.25)
        >>> report = compression_report(dense, model, torch.randn(1, 3, 16, 16))
        >>> [(row.name, row.rank) for row in report.layers]
        [('0', 6), ('1', 8)]
        >>> round(report.params_reduction, 3)
        0.706
    """
    dense_flops, ran = _count(dense_model, example_inputs)
    compact_flops, compact_ran = _count(compact_model, example_inputs)
    uncounted = uncounted_modules(dense_model, dense_flops, ran)
    uncounted.update({k: v for k, v in uncounted_modules(compact_model, compact_flops,
                                                         compact_ran).items()
                      if k not in uncounted})
    compact_modules = dict(compact_model.named_modules())
    layers = []
    for name, module in dense_model.named_modules():
        if not _is_layer(module) or name not in compact_modules:
            continue
        compact = compact_modules[name]
        layers.append(LayerCost(
            name=name, kind=type(module).__name__,
            dense_flops=dense_flops.get(name, 0), compact_flops=compact_flops.get(name, 0),
            dense_params=_params(module), compact_params=_params(compact),
            full_rank=full_rank_of(module),
            rank=compact.rank if isinstance(compact, FactorizedLayer) else None,
        ))
    report = CompressionReport(
        dense_flops=dense_flops[""], compact_flops=compact_flops[""],
        dense_params=_params(dense_model), compact_params=_params(compact_model), layers=layers,
        uncounted=uncounted,
    )
    if uncounted:
        warnings.warn(f"compression_report: {report.uncounted_note()}", UserWarning, stacklevel=2)
    if report.compact_flops > report.dense_flops or report.compact_params > report.dense_params:
        warnings.warn(f"compression_report: the compact model is bigger than the dense one "
                      f"({report.summary()})", UserWarning, stacklevel=2)
    return report


def rank_report(model: nn.Module, ranks: Mapping[str, int], example_inputs: Any,
                include_linear: bool = False) -> CompressionReport:
    """The compression report of ``model`` decomposed at ``ranks`` (``{layer: rank}``), both
    counted on copies: ``model`` itself is neither changed nor run (its forward may have side
    effects, e.g. hooks or counters). Layers of ``model`` that are already factorized count
    as compressed: "before" is the model with every layer dense.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 32, 3))
        >>> report = rank_report(model, {"1": 8}, torch.randn(1, 3, 16, 16))
        >>> [(row.name, row.rank) for row in report.layers]
        [('0', None), ('1', 8)]
    """
    from lrpet_lightning.core.transforms import decompose_, recompose_

    dense, compact = copy_model(model), copy_model(model)
    # "Before" is the dense model: layers already thin (a run continued from a checkpoint
    # that decomposed some of them) count as compressed, not as the baseline.
    recompose_(dense)
    with warnings.catch_warnings():  # decompose_'s notes are for a real decomposition
        warnings.simplefilter("ignore")
        decompose_(compact, ranks=dict(ranks), include_linear=include_linear)
    return compression_report(dense, compact, example_inputs)


def projection_summary(records: Sequence[LayerRecord], per_layer: bool = False
                       ) -> dict[str, float]:
    """What one projection did, as metrics: ``mean_kept_energy`` and ``mean_relative_change``
    over the projected layers (skipped ones left out; 0 when none), and with ``per_layer``
    ``kept_energy/<layer>`` and ``relative_change/<layer>`` for each of them.

    Example:
        >>> from lrpet_lightning.core.transforms import project_low_rank_
        >>> records = project_low_rank_(nn.Sequential(nn.Linear(8, 8)), rank_ratio=0.5,
        ...                             include_linear=True, bn_rectification=False)
        >>> sorted(projection_summary(records, per_layer=True))
        ['kept_energy/0', 'mean_kept_energy', 'mean_relative_change', 'relative_change/0']
    """
    done = [r for r in records if r.skipped is None]
    out = {"mean_kept_energy": sum(r.kept_energy for r in done) / max(len(done), 1),
           "mean_relative_change": sum(r.relative_change for r in done) / max(len(done), 1)}
    if per_layer:
        for r in done:
            out[f"kept_energy/{r.name}"] = r.kept_energy
            out[f"relative_change/{r.name}"] = r.relative_change
    return out


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (*CONV_TYPES, nn.Linear)) or is_hf_conv1d(module)
