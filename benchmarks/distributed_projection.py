"""One LRPET projection pass of torchvision ResNet-50, on 1 rank vs 2 ranks (CPU, gloo).

``project_layers_distributed_`` gives each rank a cost-balanced share of the 53 convs,
solves it, and broadcasts every projected weight from its owner. Two spawned processes,
one intra-op thread each (a fair split of 2 cores); the 1-rank pass runs in rank 0 alone
on a one-process group while rank 1 waits at a barrier, interleaved round by round with
the 2-rank pass, so that load from other processes hits both alike. Prints, side by side
in one run:

* wall time of the pass, best of ``--repeats``, for 1 and 2 ranks, and their ratio;
* inside the 2-rank pass: each rank's time solving its own share, the time spent in the
  broadcasts (which includes waiting for the owner to finish a layer) and in gathering
  the records;
* the bare cost of broadcasting all 53 weights once, after a barrier (no solving).

BN rectification is on (the BatchNorm after each conv is traced, untimed), as in the
callback. Run:  python benchmarks/distributed_projection.py [--rank-ratio 0.38] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import time
from collections import defaultdict
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

from lrpet_lightning.core import distributed
from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.distributed import assign_owners, project_layers_distributed_, svd_cost
from lrpet_lightning.core.trace import trace_bn_pairs
from lrpet_lightning.core.transforms import attach_bn_pairs
from lrpet_lightning.core.walk import TargetLayer, select_layers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Timers:
    """Accumulates the wall time spent inside wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, label: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
        return timed


def _planned(model: torch.nn.Module, config: LowRankConfig, x: torch.Tensor) -> list[TargetLayer]:
    layers = select_layers(model, config)
    attach_bn_pairs(layers, trace_bn_pairs(model, layers, x))
    return layers


def _worker(rank: int, world: int, port: int, rank_ratio: float, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=5))
    alone = dist.new_group([0])  # every rank must take part in creating a group
    torch.manual_seed(0)  # the same model on every rank
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 64, 64)
    config = LowRankConfig(rank_ratio=rank_ratio)  # default svd_method
    layers = select_layers(model, config)

    # Time spent inside the call, by part (the module's own references are wrapped).
    timers = _Timers()
    solve, broadcast, gather = (distributed.project_layers_, dist.broadcast,
                                dist.all_gather_object)
    distributed.project_layers_ = timers.wrap("own share", solve)
    dist.broadcast = timers.wrap("broadcasts", broadcast)
    dist.all_gather_object = timers.wrap("gather records", gather)

    best = {"1 rank": float("inf"), "2 ranks": float("inf")}
    parts: dict[str, float] = {}
    for _ in range(repeats):
        # 1 rank: rank 0 alone on a one-process group; rank 1 waits at the barrier.
        if rank == 0:
            fresh = _planned(copy.deepcopy(model), config, x)
            start = time.perf_counter()
            project_layers_distributed_(fresh, config, group=alone)
            best["1 rank"] = min(best["1 rank"], time.perf_counter() - start)
        dist.barrier()
        # 2 ranks: all of them, each a share; the pass ends when the slowest rank is done.
        fresh = _planned(copy.deepcopy(model), config, x)
        timers.seconds.clear()
        dist.barrier()
        start = time.perf_counter()
        project_layers_distributed_(fresh, config)
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if elapsed.item() < best["2 ranks"]:
            best["2 ranks"], parts = elapsed.item(), dict(timers.seconds)
    distributed.project_layers_, dist.broadcast, dist.all_gather_object = solve, broadcast, gather

    # The bare cost of the broadcasts: every projected weight once, no solving.
    weights = [layer.module.weight.data.contiguous() for layer in layers]
    dist.barrier()
    start = time.perf_counter()
    for weight in weights:
        dist.broadcast(weight, src=0)
    bare = torch.tensor(time.perf_counter() - start)
    dist.all_reduce(bare, op=dist.ReduceOp.MAX)

    everyone: list[dict[str, float] | None] = [None] * world
    dist.all_gather_object(everyone, parts)
    if rank == 0:
        costs = [svd_cost(layer) for layer in layers]
        owners = assign_owners(costs, world)
        shares = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) / sum(costs)
                  for r in range(world)]
        megabytes = sum(w.numel() * w.element_size() for w in weights) / 1e6
        one, two = best["1 rank"], best["2 ranks"]
        print(f"torchvision ResNet-50: {len(layers)} convs, rank_ratio {rank_ratio}, "
              f"svd_method {config.svd_method!r}, BN rectification on; gloo on CPU, 1 thread "
              f"per rank; best of {repeats} (torch {torch.__version__}, "
              f"{os.cpu_count()} CPU cores)")
        print(f"  load average (1 min) at the end: {os.getloadavg()[0]:.2f} — other processes "
              "on these cores slow the 2-rank pass most")
        print(f"  1 rank : {one:6.3f} s")
        print(f"  2 ranks: {two:6.3f} s   ratio 2-rank/1-rank = {two / one:.3f}")
        print("  planned shares of the SVD cost: "
              + " / ".join(f"{100 * s:.1f} %" for s in shares))
        for r, part in enumerate(everyone):
            assert part is not None
            print(f"  2 ranks, rank {r}: own share solved {part['own share']:.3f} s, "
                  f"broadcasts {part['broadcasts']:.3f} s (incl. waiting for owners), "
                  f"gathering records {part['gather records']:.3f} s")
        print(f"  bare broadcast of all {len(weights)} weights ({megabytes:.1f} MB), after a "
              f"barrier: {bare.item():.3f} s")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank-ratio", type=float, default=0.38)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, _free_port(), args.rank_ratio, args.repeats), nprocs=2)


if __name__ == "__main__":
    main()
