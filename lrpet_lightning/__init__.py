"""lrpet_lightning: train compact low-rank networks from scratch with LRPET.

The maths (``project_low_rank_``, ``decompose_``, ``compression_report``) is plain PyTorch;
``LowRankProjectionCallback`` (PyTorch Lightning) is imported lazily, so
``import lrpet_lightning`` does not import lightning.
"""

from __future__ import annotations

from typing import Any

from lrpet_lightning.core import *  # noqa: F403
from lrpet_lightning.core import __all__ as _core_all

__version__ = "0.1.0"
__all__ = [*_core_all, "LowRankProjectionCallback"]


def __getattr__(name: str) -> Any:
    if name == "LowRankProjectionCallback":
        from lrpet_lightning.callback import LowRankProjectionCallback

        return LowRankProjectionCallback
    raise AttributeError(f"module 'lrpet_lightning' has no attribute {name!r}")
