"""Uniform vs spectrum allocation of one FLOPs budget: test accuracy at equal FLOPs.

Trains a CIFAR ResNet-20 on the bundled digits (``DigitsDataModule``, 16x16 with random
shifts, as ``lrpet-train`` does) with ``LowRankProjectionCallback(rank_ratio=None,
target_flops_reduction=--target, allocation=...)``, projecting after every epoch, for
``--epochs`` epochs (SGD lr 0.1, cosine), once per allocation and seed; the two allocations
run interleaved on the same seeds (same initialisation, same data order). The model is
decomposed at fit end and the decomposed model is tested on the 359 held-out images.

- ``uniform``: one rank ratio for every layer, solved at the first projection.
- ``spectrum``: per-layer ranks from the BN-rectified singular value spectra after one
  epoch at full rank (``budget_warmup_epochs=1``), most energy kept per FLOP, then frozen.

Prints one line per run and the test accuracy mean ± std (over seeds) of each allocation,
with the FLOPs / parameters reduction each achieved (counted on the decomposed model).

Run:  python benchmarks/budget_allocation.py [--epochs 15] [--seeds 0 1] [--target 0.8]
                                             [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from typing import Any

import lightning as L
import torch

from lrpet_lightning import LowRankProjectionCallback
from lrpet_lightning.app.data import DigitsDataModule
from lrpet_lightning.app.module import ImageClassifier
from lrpet_lightning.models import build_model

ALLOCATIONS = ("uniform", "spectrum")


def run(allocation: str, seed: int, epochs: int, target: float, image_size: int,
        limit_train_batches: int | None = None) -> dict[str, Any]:
    """One fit + test; returns test accuracy, reductions, wall time and the layer ranks."""
    L.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(image_size=image_size, split_seed=0, augment=True)
    net = build_model("resnet20", num_classes=10, in_channels=1)
    module = ImageClassifier(net, num_classes=10, lr=0.1, scheduler="cosine",
                             max_epochs=epochs)
    cb = LowRankProjectionCallback(
        rank_ratio=None, target_flops_reduction=target, allocation=allocation,
        budget_warmup_epochs=1, decompose_on_fit_end=True, report=True,
    )
    with tempfile.TemporaryDirectory() as root:  # the report's JSON goes there
        trainer = L.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, default_root_dir=root,
            limit_train_batches=limit_train_batches,
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        seconds = time.perf_counter() - start
        (test,) = trainer.test(module, datamodule=dm, verbose=False)
    ranks = cb.state_dict()["ranks"]
    return {
        "test_acc": float(test["test/acc"]),
        "flops_reduction": cb.compression.flops_reduction,
        "params_reduction": cb.compression.params_reduction,
        "seconds": seconds,
        "ranks": " ".join(str(r) for r in ranks.values()),
    }


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--target", type=float, default=0.8, help="target_flops_reduction")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (1: tiny convs gain nothing from more)")
    parser.add_argument("--limit-train-batches", type=int, default=None,
                        help="(smoke tests) training batches per epoch")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, list[dict[str, Any]]] = {a: [] for a in ALLOCATIONS}
    total = time.perf_counter()
    for seed in args.seeds:
        for allocation in ALLOCATIONS:  # interleaved: load bursts hit both alike
            r = run(allocation, seed, args.epochs, args.target, args.image_size,
                    args.limit_train_batches)
            results[allocation].append(r)
            print(f"{allocation:8s} seed {seed}: test top-1 {100 * r['test_acc']:.2f} %  "
                  f"FLOPs -{100 * r['flops_reduction']:.2f} %  "
                  f"params -{100 * r['params_reduction']:.2f} %  {r['seconds']:.0f} s  "
                  f"ranks {r['ranks']}", flush=True)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nresnet20 on digits ({args.image_size}x{args.image_size}), {args.epochs} epochs, "
          f"target_flops_reduction {args.target}, seeds {args.seeds}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s), load average {load}; "
          f"{time.perf_counter() - total:.0f} s in all")
    means = {}
    for allocation, runs in results.items():
        accs = [100 * r["test_acc"] for r in runs]
        means[allocation] = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        flops = statistics.mean(r["flops_reduction"] for r in runs)
        params = statistics.mean(r["params_reduction"] for r in runs)
        print(f"{allocation:8s} test top-1 {means[allocation]:.2f} ± {std:.2f} %  "
              f"(FLOPs -{100 * flops:.2f} %, params -{100 * params:.2f} %)")
    diff = means["spectrum"] - means["uniform"]
    print(f"spectrum - uniform: {diff:+.2f} points")
    return results


if __name__ == "__main__":
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lrpet_lightning").setLevel(logging.WARNING)
    main()
