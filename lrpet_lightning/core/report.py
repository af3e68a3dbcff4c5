"""FLOPs and parameters before/after compression, counted by ``torch.utils.flop_counter``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lrpet_lightning.core.factorized import FactorizedLayer
from lrpet_lightning.core.walk import CONV_TYPES, full_rank_of, run_forward

__all__ = ["CompressionReport", "LayerCost", "compression_report", "count_flops"]


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
        out["params_reduction"] = self.params_reduction
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def _rows(self) -> list[list[str]]:
        rows = []
        for c in self.layers:
            rank = f"{c.rank}/{c.full_rank}" if c.rank is not None else f"dense/{c.full_rank}"
            rows.append([c.name, c.kind, rank, _human(c.dense_flops), _human(c.compact_flops),
                         _human(c.dense_params), _human(c.compact_params)])
        rows.append(["total", "", "", _human(self.dense_flops), _human(self.compact_flops),
                     _human(self.dense_params), _human(self.compact_params)])
        return rows

    _HEADER = ["layer", "type", "rank", "FLOPs before", "FLOPs after", "params before",
               "params after"]

    def summary(self) -> str:
        return (f"FLOPs {_human(self.dense_flops)} -> {_human(self.compact_flops)} "
                f"({100 * self.flops_reduction:.1f} % fewer), params "
                f"{_human(self.dense_params)} -> {_human(self.compact_params)} "
                f"({100 * self.params_reduction:.1f} % fewer)")

    def format_table(self) -> str:
        """A fixed-width text table with one row per layer and the totals, then a summary."""
        rows = [self._HEADER, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._HEADER))]
        lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([*lines, self.summary()])

    def to_markdown(self) -> str:
        """The same table in Markdown."""
        rows = [self._HEADER, ["---"] * 3 + ["---:"] * 4, *self._rows()]
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
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run_forward(model, example_inputs)
    finally:
        for module, mode in modes.items():
            module.training = mode
    root = type(model).__name__
    flops = {"": counter.get_total_flops()}
    for key, per_op in counter.get_flop_counts().items():
        if key.startswith(root + "."):
            flops[key[len(root) + 1:]] = sum(per_op.values())
    return flops


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
        >>> dense = copy.deepcopy(model); decompose_(model, rank_ratio=0.2)
        >>> report = compression_report(dense, model, torch.randn(1, 3, 32, 32))
        >>> print(report); report.flops_reduction
    """
    dense_flops = count_flops(dense_model, example_inputs)
    compact_flops = count_flops(compact_model, example_inputs)
    compact_modules = dict(compact_model.named_modules())
    layers = []
    for name, module in dense_model.named_modules():
        if not isinstance(module, (*CONV_TYPES, nn.Linear)) or name not in compact_modules:
            continue
        compact = compact_modules[name]
        layers.append(LayerCost(
            name=name, kind=type(module).__name__,
            dense_flops=dense_flops.get(name, 0), compact_flops=compact_flops.get(name, 0),
            dense_params=_params(module), compact_params=_params(compact),
            full_rank=full_rank_of(module),
            rank=compact.rank if isinstance(compact, FactorizedLayer) else None,
        ))
    return CompressionReport(
        dense_flops=dense_flops[""], compact_flops=compact_flops[""],
        dense_params=_params(dense_model), compact_params=_params(compact_model), layers=layers,
    )
