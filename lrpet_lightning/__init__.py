"""lrpet_lightning: train compact low-rank networks from scratch with LRPET.

The maths (``project_low_rank_``, ``decompose_``, ``compression_report``) is plain PyTorch;
``LowRankProjectionCallback`` (PyTorch Lightning) is imported lazily, so
``import lrpet_lightning`` does not import lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lrpet_lightning.core import (
    CompressionReport,
    FactorizedConv,
    FactorizedLayer,
    FactorizedLinear,
    LayerCost,
    LayerRecord,
    LowRankConfig,
    RankSolution,
    compression_report,
    decompose_,
    decomposed_ranks,
    load_compact,
    match_architecture_,
    prepare_for_inference,
    project_low_rank_,
    recalibrate_batchnorms_,
    recompose_,
    save_compact,
    solve_ranks,
)

if TYPE_CHECKING:  # IDEs and type checkers see it; at run time it is imported on first use
    from lrpet_lightning.callback import LowRankProjectionCallback

__version__ = "0.1.0"
__all__ = [
    "CompressionReport",
    "FactorizedConv",
    "FactorizedLayer",
    "FactorizedLinear",
    "LayerCost",
    "LayerRecord",
    "LowRankConfig",
    "LowRankProjectionCallback",
    "RankSolution",
    "compression_report",
    "decompose_",
    "decomposed_ranks",
    "load_compact",
    "match_architecture_",
    "prepare_for_inference",
    "project_low_rank_",
    "recalibrate_batchnorms_",
    "recompose_",
    "save_compact",
    "solve_ranks",
]


def __getattr__(name: str) -> Any:
    if name == "LowRankProjectionCallback":
        from lrpet_lightning.callback import LowRankProjectionCallback

        return LowRankProjectionCallback
    raise AttributeError(f"module 'lrpet_lightning' has no attribute {name!r}")
