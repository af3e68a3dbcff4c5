"""``spawn_ranks=true``: lrpet-train starts the DDP ranks itself, each running all of ``train``.

Lightning's own ``ddp_spawn`` runs only ``fit`` in its workers and loads rank 0's weights
back into the main process non-strictly: a model decomposed at fit end and the callback's
state would be lost, and validate/test would see another network. So ``trainer.strategy``
keeps Lightning's meaning, the multiprocessing strategies are refused, and the app key
``spawn_ranks`` starts ``trainer.devices`` processes as ``torchrun`` would.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

__all__ = ["check_strategy", "spawns_here", "train_spawned"]

#: Lightning strategies that start processes running only ``fit`` (its multiprocessing launcher).
_MULTIPROCESSING = ("spawn", "fork", "notebook")


def check_strategy(cfg: DictConfig) -> None:
    """Refuse what would lose the run: a multiprocessing strategy, or ``spawn_ranks`` with a
    device count the app cannot start processes for.

    Raises:
        ValueError: ``trainer.strategy`` is ddp_spawn/ddp_fork/ddp_notebook, or
            ``spawn_ranks`` with ``trainer.devices`` not a count >= 1 or several nodes.
    """
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, str) and any(word in strategy for word in _MULTIPROCESSING):
        raise ValueError(
            f"trainer.strategy={strategy} runs only fit in its processes and hands the main "
            f"process dense weights back: the compact model would be lost. Use "
            f"trainer.strategy=ddp spawn_ranks=true (as trainer=ddp_cpu does): lrpet-train "
            f"then starts the ranks itself, each running the whole run")
    if not cfg.get("spawn_ranks", False):
        return
    devices = cfg.trainer.get("devices")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"trainer.devices must be a number of processes >= 1 with "
                         f"spawn_ranks=true, got {devices!r}")
    if (cfg.trainer.get("num_nodes") or 1) != 1:
        raise ValueError(f"spawn_ranks=true starts processes on this machine only, got "
                         f"trainer.num_nodes={cfg.trainer.num_nodes}; launch several nodes "
                         f"with torchrun or SLURM and spawn_ranks=false")


def spawns_here(cfg: DictConfig) -> bool:
    """Whether this process is to start the ranks (``spawn_ranks`` and not a rank itself)."""
    return bool(cfg.get("spawn_ranks", False)) and "LOCAL_RANK" not in os.environ


def train_spawned(cfg: DictConfig) -> dict[str, Any]:
    """Run ``train`` in ``trainer.devices`` processes; return rank 0's results.json."""
    devices = cfg.trainer.devices
    container = OmegaConf.to_container(cfg, resolve=True)  # ${hydra:...} needs this process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_train_rank, args=(container, devices, port), nprocs=devices,
                       start_method="spawn")
    return json.loads((Path(container["output_dir"]) / "results.json").read_text())


def _train_rank(local_rank: int, container: dict[str, Any], world_size: int, port: int) -> None:
    from lrpet_lightning.app.train import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0",
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      RANK=str(local_rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    train(OmegaConf.create(container))
    if torch.distributed.is_initialized():  # leave together, so no rank aborts at exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
