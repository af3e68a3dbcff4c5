"""Baselines at the same FLOPs and the same epochs as LRPET: ``variant=...`` of ``lrpet-train``.

- ``lrpet`` (the default): full-size SGD with the LRPET callback, decomposed at the end.
- ``thin_init``: the model is decomposed at initialization, at the ranks the LRPET callback
  would use (``callbacks.lrpet.*``), and the thin model is trained from scratch, without
  projections. The random weights are truncated with energy transfer, so each thin pair
  starts with its dense layer's scale.
- ``dense_finetune``: trained dense, then at epoch ``max_epochs - variant.finetune_epochs``
  truncated to the same ranks by plain SVD (the best rank-r approximation: no energy
  transfer, no BN rectification), decomposed, and fine-tuned thin for the remaining epochs.
  The optimizer is rebuilt for the thin layers and the learning-rate schedule carries on
  where it was, so every variant sees the same schedule. One process only.
- ``lrpet_thin``: LRPET until epoch ``max_epochs - variant.finetune_epochs``, then
  decomposed at the callback's ranks (exact: the weights were just projected) and trained
  thin for the remaining epochs, like ``dense_finetune``'s second phase.
- ``dense``: no compression (the same as ``callbacks.lrpet=null``).

Every variant writes ``variant`` to ``results.json``; the compressed ones their measured
FLOPs and parameter reductions, so ``lrpet-summarize`` puts them on the same plot.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from lrpet_lightning.callback import LowRankProjectionCallback
from lrpet_lightning.core.checks import check_choice, check_int
from lrpet_lightning.core.decomposition import match_architecture_
from lrpet_lightning.core.transforms import decompose_, decomposed_ranks, project_low_rank_

__all__ = ["VARIANTS", "DecomposeAt", "check_variant", "decompose_thin_", "lrpet_then_thin",
           "rank_settings"]

log = logging.getLogger(__name__)

#: Names ``variant.name`` accepts.
VARIANTS = ("lrpet", "lrpet_thin", "thin_init", "dense_finetune", "dense")


def check_variant(cfg: DictConfig, world_size: int) -> tuple[str, int | None]:
    """``(name, finetune_epochs)`` of ``cfg.variant`` (``("lrpet", None)`` without one;
    ``"dense"`` for ``lrpet`` without the callback, ``callbacks.lrpet=null``).

    Raises:
        TypeError, ValueError: a bad ``variant.name`` or ``variant.finetune_epochs``, a
            compressed baseline without the LRPET callback's settings, ``dense_finetune``
            on more than one process, or a ``spectrum`` allocation for ``thin_init``.
    """
    node = cfg.get("variant")
    name = "lrpet" if node is None else node.get("name", "lrpet")
    check_choice("variant.name", name, VARIANTS)
    lrpet = (cfg.get("callbacks") or {}).get("lrpet")
    if name == "lrpet" and lrpet is None:  # callbacks.lrpet=null: what trains is dense
        return "dense", None
    if name in ("lrpet", "dense"):
        return name, None
    if lrpet is None:
        raise ValueError(f"variant={name} takes its ranks from callbacks.lrpet, which is "
                         f"null; give callbacks.lrpet (e.g. callbacks.lrpet.rank_ratio=0.4)")
    if name == "thin_init":
        budget = lrpet.get("target_flops_reduction") is not None \
            or lrpet.get("target_params_reduction") is not None
        if budget and lrpet.get("allocation", "uniform") != "uniform":
            raise ValueError("variant=thin_init solves its budget at initialization, where "
                             "the spectra say nothing: callbacks.lrpet.allocation must be "
                             f"uniform, got {lrpet.allocation!r}")
        return name, None
    epochs = cfg.trainer.max_epochs
    finetune = node.get("finetune_epochs")
    if finetune is None:
        finetune = max(1, epochs // 3)
    finetune = check_int("variant.finetune_epochs", finetune, minimum=1,
                         maximum=max(1, epochs - 1),
                         meaning=f"thin epochs after the dense ones, of trainer.max_epochs="
                                 f"{epochs}")
    if world_size > 1:
        raise ValueError(f"variant={name} runs on one process (it swaps layers and "
                         f"rebuilds the optimizer mid-fit), got {world_size} processes")
    return name, finetune


def rank_settings(callback: LowRankProjectionCallback) -> dict[str, Any]:
    """The callback's rank settings as :func:`project_low_rank_` keywords."""
    return {f.name: getattr(callback.config, f.name)
            for f in dataclasses.fields(callback.config)}


@torch.no_grad()
def decompose_thin_(net: torch.nn.Module, settings: dict[str, Any], example: torch.Tensor,
                    *, truncate_only: bool) -> dict[str, int]:
    """Project ``net`` at ``settings``' ranks and split it into thin layers, in place.

    ``truncate_only``: plain SVD truncation (no energy transfer, no BN rectification);
    otherwise energy transfer keeps each layer's scale. Returns the ranks decomposed.
    """
    settings = dict(settings)
    if truncate_only:
        settings.update(energy_transfer=False, bn_rectification=False, residual_scale=0.0)
    else:
        settings.update(bn_rectification=False, residual_scale=0.0)
    training = net.training
    net.eval()
    try:
        records = project_low_rank_(net, **settings, example_inputs=example)
    finally:
        net.train(training)
    ranks = {r.name: r.rank for r in records if r.skipped is None}
    decompose_(net, ranks=ranks, include_linear=settings["include_linear"])
    return decomposed_ranks(net)


class DecomposeAt(pl.Callback):
    """At the start of epoch ``epoch``, ``decompose(pl_module)`` splits ``net`` into thin
    layers (``dense_finetune``: an SVD truncation; ``lrpet_thin``: the LRPET callback's
    ranks, exact after its last projection), and the optimizer is rebuilt for the thin
    layers with the learning-rate schedule carried on. A checkpoint of the thin model loads
    into the dense one (the layers are split to match first)."""

    def __init__(self, net: torch.nn.Module, epoch: int,
                 decompose: Callable[[pl.LightningModule], dict[str, int]]) -> None:
        self.net, self.epoch, self.decompose = net, epoch, decompose
        net._register_load_state_dict_pre_hook(_match_checkpoint, with_module=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < self.epoch or decomposed_ranks(self.net):
            return
        ranks = self.decompose(pl_module)
        log.info("decomposed %d layer(s) at epoch %d; training the thin model from here",
                 len(ranks), trainer.current_epoch)
        trainer.strategy.setup_optimizers(trainer)  # configure_optimizers on the thin model
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            for config in trainer.lr_scheduler_configs:
                steps = trainer.current_epoch if config.interval == "epoch" \
                    else trainer.global_step
                for _ in range(steps):
                    config.scheduler.step()


def lrpet_then_thin(lrpet: LowRankProjectionCallback, epoch: int,
                    net: torch.nn.Module) -> DecomposeAt:
    """``variant=lrpet_thin``: ``lrpet`` projects until ``epoch`` (its ``stop``), then the
    returned callback decomposes at its ranks and the thin model trains on. The LRPET
    callback's fit-end work (final projection, report, decomposition) is left to the app:
    its layers are gone by then."""
    lrpet.stop = epoch if lrpet.stop is None else min(lrpet.stop, epoch)
    lrpet.final_projection = lrpet.report = lrpet.decompose_on_fit_end = False

    def decompose(pl_module: pl.LightningModule) -> dict[str, int]:
        ranks = lrpet.ranks
        # Exact after an epoch-end projection; a step schedule may have stepped since.
        project_low_rank_(pl_module, ranks=ranks, include=list(ranks), energy_transfer=False,
                          bn_rectification=False, include_linear=lrpet.config.include_linear)
        return decompose_(pl_module, ranks=ranks, include_linear=lrpet.config.include_linear)

    return DecomposeAt(net, epoch, decompose)


def _match_checkpoint(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str,
                      *args: Any) -> None:
    match_architecture_(module, state_dict, prefix)
