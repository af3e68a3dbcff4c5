"""BatchNorm statistics for the weights a model ends with.

During LRPET training a BatchNorm's running mean and variance follow the weights SGD just
stepped. A projection then changes the weights without a forward pass, so after the last
one the statistics describe weights that no longer exist. Where that projection changes
much (a schedule that projects rarely, or a high compression), the projected model scores
far below what its weights can do. :func:`recalibrate_batchnorms_` recomputes the
statistics with the final weights, on training inputs, and changes nothing else.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lrpet_lightning.core.checks import check_int
from lrpet_lightning.core.trace import run_forward

__all__ = ["RecentInputs", "recalibrate_batchnorms_"]


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


class RecentInputs:
    """Context manager that keeps the inputs of the last ``size`` training-mode calls of
    ``module`` (references, detached: no copy), to recalibrate its BatchNorms on them
    (:meth:`recalibrate`) without asking a data loader for more batches.

    Calls in eval mode (validation) and the recalibration's own calls are not kept; a call
    with both positional and keyword inputs is not kept either (one kind replays).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> with RecentInputs(net, 2) as recent:
        ...     for _ in range(3):
        ...         _ = net(torch.randn(8, 4))
        ...     recent.recalibrate(net)
        2
    """

    def __init__(self, module: nn.Module, size: int) -> None:
        self.size = check_int("size", size, minimum=1, meaning="training calls to keep")
        self._module = module
        self._kept: deque[Any] = deque(maxlen=self.size)
        self._handle: Any = None
        self._replaying = False

    def __enter__(self) -> RecentInputs:
        self._handle = self._module.register_forward_pre_hook(self._keep, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)

    def _keep(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._replaying or not module.training or (args and kwargs):
            return
        self._kept.append(_detached(kwargs or args))

    def recalibrate(self, model: nn.Module) -> int:
        """:func:`recalibrate_batchnorms_` of ``model`` on the kept inputs; the number used."""
        if not self._kept:
            return 0
        self._replaying = True
        try:
            return recalibrate_batchnorms_(model, list(self._kept), len(self._kept))
        finally:
            self._replaying = False


def _detached(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.detach()
    if isinstance(inputs, tuple) and hasattr(inputs, "_fields"):  # a namedtuple
        return type(inputs)(*(_detached(x) for x in inputs))
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_detached(x) for x in inputs)
    if isinstance(inputs, Mapping):
        return {k: _detached(v) for k, v in inputs.items()}
    return inputs
