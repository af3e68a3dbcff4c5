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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lrpet_lightning.core.checks import check_int
from lrpet_lightning.core.trace import run_forward

__all__ = ["RecentInputs", "load_norm_statistics_", "norm_statistics", "recalibrate_batchnorms_",
           "running_norms"]


def running_norms(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of ``model``'s BatchNorms (any dimension, SyncBatchNorm) that
    keep running statistics; a lazy one not yet run has none. (An InstanceNorm with
    ``track_running_stats=True`` is not one: it cannot average batches alike,
    ``momentum=None`` freezes its statistics, so it keeps what it has.)"""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats
            and not isinstance(m.running_mean, nn.parameter.UninitializedBuffer)}


def norm_statistics(model: nn.Module) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """``{name: (running_mean, running_var, num_batches_tracked)}`` of
    :func:`running_norms`, copied to the CPU (e.g. to broadcast one process's to all)."""
    return {name: (m.running_mean.detach().cpu().clone(), m.running_var.detach().cpu().clone(),
                   m.num_batches_tracked.detach().cpu().clone())
            for name, m in running_norms(model).items()}


@torch.no_grad()
def load_norm_statistics_(model: nn.Module,
                          statistics: dict[str, tuple[Tensor, Tensor, Tensor]]) -> None:
    """Copy :func:`norm_statistics` (of this model or a replica) into ``model``'s norms."""
    norms = running_norms(model)
    for name, (mean, var, tracked) in statistics.items():
        _copy_statistics(norms[name], mean, var, tracked)


def _copy_statistics(m: nn.Module, mean: Tensor, var: Tensor, tracked: Tensor) -> None:
    m.running_mean.copy_(mean)
    m.running_var.copy_(var)
    m.num_batches_tracked.copy_(tracked)


def recalibrate_batchnorms_(model: nn.Module, inputs: Iterable[Any], max_batches: int) -> int:
    """Recompute every BatchNorm's running statistics of ``model`` from ``inputs``, in place.

    The statistics are reset and averaged over (at most) ``max_batches`` batches, each
    weighted alike (``momentum=None``), with the norms in training mode and everything else
    in eval mode (no dropout); weights are not touched and no gradient is kept. Each
    module's mode and momentum are restored. Every BatchNorm with running statistics counts
    (any dimension, SyncBatchNorm; see :func:`running_norms`); one the inputs never reach
    (a training-only branch) keeps its statistics, and if a forward fails every BatchNorm
    gets its statistics back before the error is raised.

    Args:
        model: any ``nn.Module``.
        inputs: model inputs, one batch each (a tensor, a tuple of arguments or a dict of
            keyword arguments), e.g. ``(x for x, _ in train_loader)``.
        max_batches: how many batches to use, >= 1.

    Returns:
        The number of batches used (0: ``model`` has no such BatchNorm, or ``inputs`` is empty;
        the statistics are then left as they were).

    Raises:
        ValueError: a batch does not run through ``model`` (the statistics are restored).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
        >>> recalibrate_batchnorms_(model, (torch.randn(4, 3, 8, 8) for _ in range(3)), 2)
        2
        >>> model.training, int(model[1].num_batches_tracked)
        (False, 2)
    """
    max_batches = check_int("max_batches", max_batches, minimum=1,
                            meaning="batches to average the statistics over")
    calls = (lambda batch=batch: run_forward(model, batch) for batch in inputs)
    return _recalibrate(model, calls, max_batches)


@torch.no_grad()
def _recalibrate(model: nn.Module, calls: Iterable[Callable[[], Any]], max_batches: int) -> int:
    """:func:`recalibrate_batchnorms_` with each batch given as a call that runs it."""
    norms = list(running_norms(model).values())
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    saved = {m: (m.momentum, m.running_mean.clone(), m.running_var.clone(),
                 m.num_batches_tracked.clone()) for m in norms}
    reached: set[nn.Module] = set()
    hooks = [m.register_forward_pre_hook(lambda m, _: reached.add(m)) for m in norms]
    used, failed = 0, True
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: every batch counts alike
            m.train()
        for call in calls:
            if used == max_batches:
                break
            call()
            used += 1
        failed = False
    finally:
        for hook in hooks:
            hook.remove()
        for m, (momentum, mean, var, tracked) in saved.items():
            m.momentum = momentum
            if failed or m not in reached:  # keep what it had rather than none or a part
                _copy_statistics(m, mean, var, tracked)
        for m, training in modes.items():
            m.train(training)
    return used


class RecentInputs:
    """Context manager that keeps the inputs of the last ``size`` training-mode calls of
    ``module`` (references, detached: no copy), to recalibrate its BatchNorms on them
    (:meth:`recalibrate`) without asking a data loader for more batches.

    Calls in eval mode (validation) and the recalibration's own calls are not kept. A
    module that changes its input in place would replay the changed input.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> with RecentInputs(net, 2) as recent:
        ...     for _ in range(3):
        ...         _ = net(torch.randn(8, 4))
        ...     recent.recalibrate()
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
        if self._replaying or not module.training:
            return
        self._kept.append((_detached(args), _detached(kwargs)))

    def recalibrate(self, model: nn.Module | None = None) -> int:
        """:func:`recalibrate_batchnorms_` of ``model`` (default: the hooked module), each
        kept call replayed as it was made (``module(*args, **kwargs)``); the number used."""
        if not self._kept:
            return 0
        module = self._module
        model = module if model is None else model
        self._replaying = True
        try:
            calls = [lambda a=a, k=k: module(*a, **k) for a, k in self._kept]
            return _recalibrate(model, calls, len(calls))
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
