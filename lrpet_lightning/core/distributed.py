"""Distributed projection: each layer's SVD is computed once, by one rank, and broadcast.

Under DDP every process holds a replica of the model. If every rank projected on its own,
SVD sign/rounding differences between devices and library versions (and any drift between
replicas) would leave the replicas different. Instead the layers are shared out between
the ranks, balanced by cost, each rank projects its own share, and every projected weight
is broadcast from its owner — so all replicas end bitwise identical, and the projection's
wall time falls as ranks are added. Plain ``torch.distributed``: no Lightning here.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
import torch.distributed as dist

from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.transforms import LayerRecord, project_layers_
from lrpet_lightning.core.walk import TargetLayer

__all__ = ["assign_owners", "project_layers_distributed_", "svd_cost"]


def svd_cost(layer: TargetLayer) -> int:
    """Relative cost of one layer's projection: ``rows * cols * min(rows, cols)``.

    Zero for a layer kept at full rank: ``project_layers_`` skips it without a solve.
    """
    if layer.rank >= layer.full_rank:
        return 0
    rows = layer.module.weight.shape[0]
    cols = layer.module.weight[0].numel()
    return rows * cols * min(rows, cols)


def assign_owners(costs: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each job: longest job first onto the least loaded rank (LPT).

    Deterministic (ties broken by index and rank), so every rank computes the same plan.
    The largest load exceeds the best possible one by at most the largest job.

    Raises:
        ValueError: ``world_size`` is not an int >= 1, or a cost is negative.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if any(c < 0 for c in costs):
        raise ValueError(f"costs must be >= 0, got {list(costs)!r}")
    owners = [0] * len(costs)
    loads = [(0, rank) for rank in range(world_size)]
    heapq.heapify(loads)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + costs[index], rank))
    return owners


def project_layers_distributed_(
    layers: Sequence[TargetLayer], config: LowRankConfig, group: dist.ProcessGroup | None = None
) -> list[LayerRecord]:
    """``project_layers_`` shared across the ranks of ``group`` (all ranks must call it).

    Without an initialized process group, or with one process, it is ``project_layers_``.
    Every rank returns the records of all layers, in ``layers`` order.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return project_layers_(layers, config)
    world = dist.get_world_size(group)
    if world == 1:
        return project_layers_(layers, config)
    rank = dist.get_rank(group)
    owners = assign_owners([svd_cost(layer) for layer in layers], world)
    mine = [layer for layer, owner in zip(layers, owners, strict=True) if owner == rank]
    my_records = {r.name: r for r in project_layers_(mine, config)}

    with torch.no_grad():
        # Into buffers first, then all written at once: an interruption mid-way leaves every
        # replica as it was, never half projected (as project_layers_ does on one process).
        received = []
        for layer, owner in zip(layers, owners, strict=True):
            src = dist.get_global_rank(group, owner) if group is not None else owner
            buffer = layer.module.weight.detach().contiguous().clone()
            dist.broadcast(buffer, src=src, group=group)
            received.append(buffer)
        for layer, buffer in zip(layers, received, strict=True):
            layer.module.weight.copy_(buffer)

    gathered: list[dict[str, LayerRecord] | None] = [None] * world
    dist.all_gather_object(gathered, my_records, group=group)
    merged: dict[str, LayerRecord] = {}
    for part in gathered:
        merged.update(part or {})
    return [merged[layer.name] for layer in layers]
