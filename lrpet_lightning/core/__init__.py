"""Plain-PyTorch core of LRPET: tensor maths, model walking and module transforms.

Nothing under ``lrpet_lightning.core`` imports lightning or hydra (a test enforces it).
"""

from __future__ import annotations

from lrpet_lightning.core.budget import RankSolution, solve_ranks
from lrpet_lightning.core.checkpoint import load_compact, read_compact, save_compact
from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.factorized import FactorizedConv, FactorizedLayer, FactorizedLinear
from lrpet_lightning.core.inference import prepare_for_inference
from lrpet_lightning.core.linalg import project_matrix, rank_from_ratio, top_singular_triplets
from lrpet_lightning.core.report import CompressionReport, LayerCost, compression_report
from lrpet_lightning.core.trace import BNPairTracer, trace_bn_pairs
from lrpet_lightning.core.transforms import (
    LayerRecord,
    decompose_,
    decomposed_ranks,
    match_architecture_,
    project_layers_,
    project_low_rank_,
    recompose_,
)
from lrpet_lightning.core.walk import TargetLayer, select_layers

__all__ = [
    "BNPairTracer",
    "CompressionReport",
    "FactorizedConv",
    "FactorizedLayer",
    "FactorizedLinear",
    "LayerCost",
    "LayerRecord",
    "LowRankConfig",
    "RankSolution",
    "TargetLayer",
    "compression_report",
    "decompose_",
    "decomposed_ranks",
    "load_compact",
    "match_architecture_",
    "prepare_for_inference",
    "project_layers_",
    "project_low_rank_",
    "project_matrix",
    "rank_from_ratio",
    "read_compact",
    "recompose_",
    "save_compact",
    "select_layers",
    "solve_ranks",
    "top_singular_triplets",
    "trace_bn_pairs",
]
