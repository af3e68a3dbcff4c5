"""Plain-PyTorch core of LRPET: tensor maths, model walking and module transforms.

Nothing under ``lrpet_lightning.core`` imports lightning or hydra (a test enforces it).
Here are the verbs, their partners and the types they return; the building blocks
(``walk.select_layers``, ``trace.BNPairTracer``, ``linalg.project_matrix``, ...) stay
public in their submodules.
"""

from __future__ import annotations

from lrpet_lightning.core.batchnorm import recalibrate_batchnorms_
from lrpet_lightning.core.budget import RankSolution, solve_ranks
from lrpet_lightning.core.checkpoint import load_compact, save_compact
from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.factorized import FactorizedConv, FactorizedLayer, FactorizedLinear
from lrpet_lightning.core.inference import prepare_for_inference
from lrpet_lightning.core.report import CompressionReport, LayerCost, compression_report
from lrpet_lightning.core.transforms import (
    LayerRecord,
    decompose_,
    decomposed_ranks,
    match_architecture_,
    project_low_rank_,
    recompose_,
)

__all__ = [
    "CompressionReport",
    "FactorizedConv",
    "FactorizedLayer",
    "FactorizedLinear",
    "LayerCost",
    "LayerRecord",
    "LowRankConfig",
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
