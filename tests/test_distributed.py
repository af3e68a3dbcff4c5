"""LRPET under DDP, on CPU with gloo: each layer projected once by one rank and broadcast, so
replicas end bitwise identical — in a process group, in a ``ddp_spawn`` fit, in a two-"node"
``torchrun`` run, through the Hydra app's ``ddp_cpu`` trainer — and the SLURM launcher config.

Every test that starts processes kills them, and all they started, past a deadline.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import compose
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrpet_lightning.callback import LowRankProjectionCallback
from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.distributed import assign_owners, project_layers_distributed_, svd_cost
from lrpet_lightning.core.transforms import project_layers_
from lrpet_lightning.core.walk import select_layers

TESTS = Path(__file__).resolve().parent
DEADLINE_S = 180  # per launch; a healthy one takes 5-30 s on 2 CPU cores
COLLECTIVE_TIMEOUT = timedelta(seconds=90)  # a rank stuck in a collective fails, not hangs
# Child processes: one intra-op thread each (2 ranks on 2 cores), no stray GPUs.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
             "PYTHONWARNINGS": "ignore"}


# ------------------------------------------------------------------------- process helpers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment carries ``tag``: the processes a test started
    and all their descendants, wherever they went (torchrun starts each worker in a session of
    its own, out of reach of a process-group kill)."""
    entry = f"LRPET_TEST_RUN={tag}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if entry in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):  # gone, or not ours to read
            continue


def _run_all(commands: list[list[str]], cwd: Path, deadline_s: float = DEADLINE_S) -> list[str]:
    """Run commands side by side and return their outputs. Stops at the first failure or at
    the deadline, and leaves no process behind."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    env = {**CHILD_ENV, "LRPET_TEST_RUN": tag}
    logs = [cwd / f"proc{i}.log" for i in range(len(commands))]
    procs = []
    try:
        for command, log in zip(commands, logs, strict=True):
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=out,
                                              stderr=subprocess.STDOUT))
        end = time.monotonic() + deadline_s
        while any(p.poll() is None for p in procs):
            if time.monotonic() > end or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        _kill_tagged(tag)
        for p in procs:
            p.wait()
    outputs = [log.read_text(errors="replace") for log in logs]
    for p, command, output in zip(procs, commands, outputs, strict=True):
        assert p.returncode == 0, f"{' '.join(command)} exited {p.returncode}:\n{output[-4000:]}"
    return outputs


# --------------------------------------------------------------------- 1. the work plan
def _optimum(costs: list[int], world: int) -> int:
    return min(max(sum(c for c, o in zip(costs, owners, strict=True) if o == r)
                   for r in range(world))
               for owners in itertools.product(range(world), repeat=len(costs)))


def test_assign_owners_plans_every_job_deterministically_and_balanced() -> None:
    rng = random.Random(0)
    for _ in range(30):
        world = rng.choice([2, 3, 4])
        costs = [rng.choice([0, 1, 7, 8, 9, 64, 500]) for _ in range(rng.randint(1, 8))]
        owners = assign_owners(costs, world)
        assert owners == assign_owners(list(costs), world)  # every rank plans the same
        assert len(owners) == len(costs) and set(owners) <= set(range(world))
        loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world)]
        assert max(loads) <= _optimum(costs, world) + max(costs), (costs, world, owners)
    assert assign_owners([5, 3, 9], 1) == [0, 0, 0]
    assert assign_owners([], 4) == []
    assert assign_owners([1, 2], 4) == [1, 0]  # more ranks than jobs: one job each
    assert assign_owners([4, 4, 4, 4], 2) == [0, 1, 0, 1]  # ties: by index, then rank


def test_assign_owners_balances_resnet50_within_one_percent() -> None:
    torchvision = pytest.importorskip("torchvision")
    layers = select_layers(torchvision.models.resnet50(), LowRankConfig(rank_ratio=0.38))
    costs = [svd_cost(layer) for layer in layers]
    assert len(costs) == 53
    for world in (2, 4):
        owners = assign_owners(costs, world)
        loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world)]
        assert max(loads) <= 1.01 * sum(costs) / world


@pytest.mark.parametrize("world_size", [0, -1, 1.0, True, "2"])
def test_assign_owners_rejects_a_bad_world_size(world_size: Any) -> None:
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        assign_owners([1, 2], world_size)


def test_a_layer_kept_at_full_rank_costs_nothing() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1))
    layers = select_layers(net, LowRankConfig(rank_ratio=0.5, ranks={"1": 1.0}))
    assert svd_cost(layers[0]) == 8 * 27 * 8 and svd_cost(layers[1]) == 0


def test_without_a_process_group_it_is_project_layers_() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    twin = copy.deepcopy(net)
    config = LowRankConfig(rank_ratio=0.25)
    assert not dist.is_initialized()
    records = project_layers_distributed_(select_layers(net, config), config)
    assert records == project_layers_(select_layers(twin, config), config)
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------- 2. a process group, rank 1 drifted
# A plain script per rank (torch, torchvision and lrpet_lightning.core only: importing this
# test module would import Lightning too, seconds per process).
PROJECTION_SCRIPT = """\
import copy, sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch import nn

from lrpet_lightning.core import distributed
from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.distributed import project_layers_distributed_, svd_cost
from lrpet_lightning.core.transforms import attach_bn_pairs, project_layers_
from lrpet_lightning.core.trace import trace_bn_pairs
from lrpet_lightning.core.walk import select_layers

rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=world, timeout=timedelta(seconds=90))

# ResNet-18, identical on every rank (channels_last: its 3x3 weights are not contiguous),
# with non-trivial BN statistics; then rank 1's replica drifts a little.
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10).to(memory_format=torch.channels_last)
x = torch.randn(2, 3, 32, 32)
model.train()(x)
model.eval()
if rank == 1:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.add_(1e-2 * torch.randn(m.weight.shape, generator=g))
            elif isinstance(m, nn.BatchNorm2d):
                m.running_var.mul_(1.5)

config = LowRankConfig(rank_ratio=0.5, include_linear=True)

def planned(net):
    layers = select_layers(net, config)
    attach_bn_pairs(layers, trace_bn_pairs(net, layers, x))
    return layers

# This rank's own single-process projection of its replica, for reference.
reference = copy.deepcopy(model)
ref_records = project_layers_(planned(reference), config)

layers = planned(model)
contiguous = [layer.module.weight.is_contiguous() for layer in layers]
computed = []
solve = distributed.project_layers_

def counting(mine, cfg):
    computed.extend(layer.name for layer in mine)
    return solve(mine, cfg)

distributed.project_layers_ = counting
records = project_layers_distributed_(layers, config)
first_call = list(computed)
weights = {layer.name: layer.module.weight.detach().clone() for layer in layers}
# Once more on an explicit group (a new group of all ranks) and a few layers.
again = project_layers_distributed_(layers[:4], config, group=dist.new_group(list(range(world))))
distributed.project_layers_ = solve

names = [layer.name for layer in layers]
torch.save({
    "names": names,
    "weights": weights,
    "weights_again": {layer.name: layer.module.weight.detach().clone() for layer in layers[:4]},
    "reference": {n: m.weight.detach().clone() for n, m in reference.named_modules()
                  if n in names},
    "records": [r.to_dict() for r in records],
    "ref_records": [r.to_dict() for r in ref_records],
    "again": [r.to_dict() for r in again],
    "computed": first_call,
    "costs": [svd_cost(layer) for layer in layers],
    "contiguous_before": contiguous,
    "channels_last_after": [layer.module.weight.is_contiguous(memory_format=torch.channels_last)
                            for layer in layers if layer.module.weight.dim() == 4],
}, out / f"rank{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_project_layers_distributed_shares_the_work_and_makes_replicas_identical(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torchvision")
    script = tmp_path / "project.py"
    script.write_text(PROJECTION_SCRIPT)
    port = _free_port()
    _run_all([[sys.executable, str(script), str(rank), "2", str(port), str(tmp_path)]
              for rank in (0, 1)], cwd=tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    names = r0["names"]
    assert len(names) == 21 and names == r1["names"]  # 20 convs + fc
    # Non-contiguous (channels_last) weights were broadcast and written back in place.
    assert not all(r0["contiguous_before"]) and all(r0["channels_last_after"])

    # Each rank solved exactly its share of the plan, and the shares cover every layer.
    owners = assign_owners(r0["costs"], 2)
    for rank, result in enumerate((r0, r1)):
        assert result["computed"] == [n for n, o in zip(names, owners, strict=True) if o == rank]
    assert r0["computed"] and r1["computed"]

    refs = (r0["reference"], r1["reference"])
    for name, owner in zip(names, owners, strict=True):
        # The drift matters: each rank alone would have projected differently ...
        assert not torch.equal(r0["reference"][name], r1["reference"][name]), name
        # ... but every replica now holds its owner's projection, bit for bit.
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
        assert torch.equal(r0["weights"][name], refs[owner][name]), name

    # Both ranks return every record, in layer order: the owner's own record.
    assert r0["records"] == r1["records"]
    assert [r["name"] for r in r0["records"]] == names
    ref_records = ({r["name"]: r for r in r0["ref_records"]},
                   {r["name"]: r for r in r1["ref_records"]})
    for record, owner in zip(r0["records"], owners, strict=True):
        assert record == ref_records[owner][record["name"]]
    assert r0["again"] == r1["again"] and [r["name"] for r in r0["again"]] == names[:4]
    for name in names[:4]:
        assert torch.equal(r0["weights_again"][name], r1["weights_again"][name]), name


# ------------------------------------------------- 3./4. a fit, one replica drifted
class TinyNet(L.LightningModule):
    """conv -> BN -> conv -> BN -> head, on 16 fixed random images (4 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 3, 8, 8, generator=g),
                             torch.randint(0, 4, (16,), generator=g))
        return DataLoader(data, batch_size=4)  # Lightning adds the DistributedSampler


EVERY = 2  # projection schedule of the fits below: epoch 1, then the final projection
CONV_WEIGHTS = ("conv1.weight", "conv2.weight")


def _before_projection(trainer: L.Trainer) -> bool:
    return trainer.is_last_batch and (trainer.current_epoch + 1) % EVERY == 0


class DriftOnRank1(Callback):
    """On rank 1, nudges the conv weights and the head's bias right before each projection
    of the LRPET callback listed after it: a replica that drifted, as one that projected on
    its own (SVD signs and rounding differ between devices) would."""

    def _drift(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 1:
            return
        g = torch.Generator().manual_seed(trainer.global_step)
        with torch.no_grad():
            for name in CONV_WEIGHTS:
                w = pl_module.get_parameter(name)
                w.add_(1e-2 * torch.randn(w.shape, generator=g))
            pl_module.fc.bias.add_(1.0)  # not projected: stays different

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           *args: Any) -> None:
        if _before_projection(trainer):
            self._drift(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._drift(trainer, pl_module)  # before the final projection


class SaveWeights(Callback):
    """Listed after the LRPET callback: saves this rank's parameters after each projection."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> None:
        lrpet = next(c for c in trainer.callbacks if isinstance(c, LowRankProjectionCallback))
        torch.save({
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "num_projections": lrpet.num_projections,
            "environment": type(trainer.strategy.cluster_environment).__name__,
            "world_size": trainer.world_size,
        }, Path(self.out_dir) / f"rank{trainer.global_rank}_{when}.pt")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           *args: Any) -> None:
        if _before_projection(trainer):
            self._save(trainer, pl_module, f"epoch{trainer.current_epoch}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "end")


def fit_with_a_drifting_replica(out_dir: str, **trainer_kwargs: Any) -> None:
    """Three epochs of TinyNet with LRPET every second epoch (projections: at the end of
    epoch 1, and the final one), rank 1 nudged before each; weights saved after each."""
    L.seed_everything(0, verbose=False)
    lrpet = LowRankProjectionCallback(rank_ratio=0.25, every_n_epochs=EVERY, report=False)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[DriftOnRank1(), lrpet, SaveWeights(out_dir)], **trainer_kwargs,
    )
    trainer.fit(TinyNet())


def _assert_replicas_identical_after_each_projection(out: Path, environment: str) -> None:
    for when, projections in (("epoch1", 1), ("end", 2)):
        r0, r1 = (torch.load(out / f"rank{r}_{when}.pt", weights_only=True) for r in (0, 1))
        for saved in (r0, r1):
            assert saved["num_projections"] == projections, when
            assert saved["world_size"] == 2 and saved["environment"] == environment
        # The drift took hold on rank 1 (the unprojected bias still shows it) ...
        assert not torch.equal(r0["params"]["fc.bias"], r1["params"]["fc.bias"]), when
        # ... yet every projected weight is bitwise the same on both ranks.
        for name in CONV_WEIGHTS:
            assert torch.equal(r0["params"][name], r1["params"][name]), (when, name)


@pytest.mark.slow
def test_ddp_spawn_fit_keeps_projected_replicas_identical(tmp_path: Path) -> None:
    strategy = DDPStrategy(start_method="spawn", timeout=COLLECTIVE_TIMEOUT)
    fit_with_a_drifting_replica(str(tmp_path), devices=2, strategy=strategy)
    _assert_replicas_identical_after_each_projection(tmp_path, "LightningEnvironment")


TORCHRUN_SCRIPT = """\
import sys
from datetime import timedelta
sys.path.insert(0, {tests!r})
from lightning.pytorch.strategies import DDPStrategy
from test_distributed import fit_with_a_drifting_replica

strategy = DDPStrategy(timeout=timedelta(seconds=90))
fit_with_a_drifting_replica(sys.argv[1], devices=1, num_nodes=2, strategy=strategy)

# Leave together: a rank that exits while its peer's gloo threads still run can abort
# ("terminate called without an active exception").
import torch.distributed as dist
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_torchrun_nodes_end_with_identical_projected_weights(tmp_path: Path) -> None:
    script = tmp_path / "fit.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(TESTS)))
    port = _free_port()
    commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                 "--node_rank", str(node), "--nproc_per_node", "1",
                 "--master_addr", "127.0.0.1", "--master_port", str(port),
                 str(script), str(tmp_path)] for node in (0, 1)]
    _run_all(commands, cwd=tmp_path)
    _assert_replicas_identical_after_each_projection(tmp_path, "TorchElasticEnvironment")


# ------------------------------------------------------ 5. the app's ddp_cpu trainer
def _app_overrides(*extra: str) -> list[str]:
    return ["trainer=ddp_cpu", "data=fake", "data.num_samples=16", "data.batch_size=4",
            "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
            "+trainer.enable_progress_bar=false", "~callbacks.progress_bar",
            "test=false", *extra]  # every rank runs the whole run: a test split costs time


_compose = compose


def test_the_ddp_cpu_trainer_has_the_app_start_lightning_ddp_ranks() -> None:
    """trainer.strategy means what Lightning says (ddp); spawn_ranks is the app's own key."""
    cfg = _compose("output_dir=/unused", *_app_overrides())
    assert cfg.spawn_ranks is True and cfg.trainer.strategy == "ddp"
    assert cfg.trainer.devices == 2


@pytest.mark.slow
def test_train_with_the_ddp_cpu_trainer_reports_the_compact_model(tmp_path: Path) -> None:
    from lrpet_lightning.app.train import load_compact_model, train

    results = train(_compose(f"output_dir={tmp_path}", *_app_overrides("bn_recalibration=2")))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["epochs"] == 1
    assert written["bn_recalibration_batches"] == 2 and written["errors"] == []  # and shared
    assert written["flops_reduction"] > 0.3 and written["params_reduction"] > 0.3
    assert results["flops_reduction"] == written["flops_reduction"]
    assert (tmp_path / "compression_report.md").is_file()
    load_compact_model(written["compact_model"])  # the trained, decomposed network


@pytest.mark.slow
def test_app_cli_with_the_ddp_cpu_trainer_makes_one_run_dir(tmp_path: Path) -> None:
    [output] = _run_all([[sys.executable, "-m", "lrpet_lightning.app", *_app_overrides()]],
                        cwd=tmp_path)
    run_dirs = sorted(p.parent for p in tmp_path.rglob(".hydra"))
    assert len(run_dirs) == 1, run_dirs
    assert run_dirs[0].parent.parent.name == "outputs"
    assert (run_dirs[0] / "results.json").is_file(), output[-3000:]


def test_ckpt_path_last_starts_fresh_then_resumes_a_requeued_run(tmp_path: Path) -> None:
    """A requeued job reruns the very same command: with ckpt_path=last its first launch
    starts from scratch (no last.ckpt yet) and every later one resumes from last.ckpt."""
    from lrpet_lightning.app.train import train

    def run(epochs: int) -> dict[str, Any]:
        return train(_compose(
            f"output_dir={tmp_path}", "ckpt_path=last", "data=fake", "data.num_samples=8",
            "data.batch_size=4", f"trainer.max_epochs={epochs}",
            "+trainer.limit_val_batches=1", "+trainer.enable_progress_bar=false",
            "~callbacks.progress_bar", "test=false"))

    last = tmp_path / "checkpoints" / "last.ckpt"

    def lrpet_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
        [key] = [k for k in checkpoint["callbacks"] if k.startswith("LowRankProjection")]
        return checkpoint["callbacks"][key]

    assert run(1)["epochs"] == 1  # warns that there is no last.ckpt yet
    checkpoint = torch.load(last, weights_only=False)
    assert lrpet_state(checkpoint)["num_projections"] == 1
    lrpet_state(checkpoint)["num_projections"] = 100  # a mark: only a resumed run sees it
    torch.save(checkpoint, last)

    assert run(2)["epochs"] == 2
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 4  # 2 optimizer steps per epoch
    assert lrpet_state(checkpoint)["num_projections"] == 101  # resumed, then one more


# ----------------------------------------------------------- the SLURM launcher config
class _Submitted(Exception):
    """Raised instead of submitting: the executor is inspected, nothing reaches SLURM."""


def test_slurm_launcher_config_makes_one_task_per_gpu_on_every_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="the slurm extra (hydra-submitit-launcher) is not installed")
    import hydra
    import submitit

    cfg = _compose("hydra/launcher=slurm", "experiment=imagenet_resnet50",
                   "trainer=ddp_multinode", "trainer.num_nodes=4", "data.root=/data/imagenet",
                   "hydra.launcher.partition=gpu", "ckpt_path=last",
                   f"hydra.sweep.dir={tmp_path / 'multirun'}", "output_dir=/unused",
                   return_hydra_config=True)
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["nodes"] == 4 and launcher.params["tasks_per_node"] == 8
    assert launcher.params["gpus_per_node"] == 8 and launcher.params["max_num_timeout"] > 0
    one_node = _compose("hydra/launcher=slurm", "trainer=ddp_cpu", "output_dir=/unused",
                        return_hydra_config=True)  # a trainer config without num_nodes
    assert hydra.utils.instantiate(one_node.hydra.launcher).params["nodes"] == 1

    # The launcher's own code turns its keys into sbatch options; stop it at submission.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks srun exists
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    seen: dict[str, Any] = {}

    def stop(executor: Any, *args: Any) -> None:
        seen["executor"] = executor
        raise _Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", stop)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(_Submitted):
        launcher.launch([["callbacks.lrpet.rank_ratio=0.38"]], initial_job_idx=0)
    executor = seen["executor"]
    assert executor._executor.max_num_timeout == launcher.params["max_num_timeout"]
    sbatch = executor._executor._make_submission_file_text("python -m submitit", "0")
    for option in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                   "--partition=gpu", f"--cpus-per-task={launcher.params['cpus_per_task']}",
                   f"--time={launcher.params['timeout_min']}", "--signal=USR2@"):
        assert f"#SBATCH {option}" in sbatch, (option, sbatch)
