"""BatchNorm statistics for the weights a model ends with.

During LRPET training a BatchNorm's running mean and variance follow the weights SGD just
stepped. A projection then changes the weights without a forward pass, so after the last
one the statistics describe weights that no longer exist. Where that projection changes
much (a schedule that projects rarely, or a high compression), the projected model scores
far below what its weights can do. :func:`recalibrate_batchnorms_` recomputes the
statistics with the final weights, on training inputs, and changes nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lrpet_lightning.core.checks import check_int
from lrpet_lightning.core.trace import run_forward

__all__ = ["recalibrate_batchnorms_"]


@torch.no_grad()
def recalibrate_batchnorms_(model: nn.Module, inputs: Iterable[Any], max_batches: int) -> int:
    """Recompute every BatchNorm's running statistics of ``model`` from ``inputs``, in place.

    The statistics are reset and averaged over (at most) ``max_batches`` batches, each
    weighted alike (``momentum=None``), with the BatchNorms in training mode and everything
    else in eval mode (no dropout); weights are not touched and no gradient is kept. Each
    module's mode and momentum are restored.

    Args:
        model: any ``nn.Module``.
        inputs: model inputs, one batch each (a tensor, a tuple of arguments or a dict of
            keyword arguments), e.g. ``(x for x, _ in train_loader)``.
        max_batches: how many batches to use, >= 1.

    Returns:
        The number of batches used (0: ``model`` has no BatchNorm, or ``inputs`` is empty;
        the statistics are then left as they were).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
        >>> recalibrate_batchnorms_(model, (torch.randn(4, 3, 8, 8) for _ in range(3)), 2)
        2
        >>> model.training, int(model[1].num_batches_tracked)
        (False, 2)
    """
    max_batches = check_int("max_batches", max_batches, minimum=1,
                            meaning="batches to average the statistics over")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    saved = {m: (m.momentum, m.running_mean.clone(), m.running_var.clone(),
                 m.num_batches_tracked.clone()) for m in norms}
    used = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: every batch counts alike
            m.train()
        for batch in inputs:
            if used == max_batches:
                break
            run_forward(model, batch)
            used += 1
    finally:
        for m, (momentum, mean, var, tracked) in saved.items():
            m.momentum = momentum
            if used == 0:  # nothing seen: keep the old statistics rather than none
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
        for m, training in modes.items():
            m.train(training)
    return used
