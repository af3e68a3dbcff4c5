"""Wall-time overhead of ``LowRankProjectionCallback`` on a small real fit.

Fits ResNet-20 on the bundled digits (``DigitsDataModule``) for ``--epochs`` epochs, with
``LowRankProjectionCallback(rank_ratio=0.4, report=False)`` projecting after every epoch
and without it; same seed, same data order. The two fits are interleaved ``--repeats``
times (a burst of load from other processes hits both alike) and the best ``trainer.fit``
wall time of each is kept. Prints the ratio with/without; the issue's target is <= 1.03.

Run:  python benchmarks/overhead.py [--epochs 5] [--repeats 2] [--image-size 32] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import lightning as L
import torch

from lrpet_lightning import LowRankProjectionCallback
from lrpet_lightning.app.data import DigitsDataModule
from lrpet_lightning.app.module import ImageClassifier
from lrpet_lightning.models import build_model

TARGET = 1.03


def fit_seconds(with_callback: bool, epochs: int, image_size: int, seed: int = 0) -> float:
    """Wall time of one ``trainer.fit`` (model and data are built outside the timing)."""
    L.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(image_size=image_size, split_seed=seed)
    net = build_model("resnet20", num_classes=10, in_channels=1)
    module = ImageClassifier(net, num_classes=10)
    callbacks = [LowRankProjectionCallback(rank_ratio=0.4, report=False)] if with_callback else []
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    best = {False: float("inf"), True: float("inf")}
    for _ in range(args.repeats):
        for with_callback in (False, True):
            seconds = fit_seconds(with_callback, args.epochs, args.image_size)
            best[with_callback] = min(best[with_callback], seconds)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    ratio = best[True] / best[False]
    print(f"resnet20 on digits ({args.image_size}x{args.image_size}), {args.epochs} epochs, "
          f"projection every epoch at rank_ratio 0.4; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), load average {load}; best of {args.repeats}, "
          f"interleaved")
    print(f"fit without callback: {best[False]:.2f} s   with callback: {best[True]:.2f} s")
    print(f"ratio with/without: {ratio:.3f}  (target <= {TARGET}: "
          f"{'MET' if ratio <= TARGET else 'NOT MET'})")


if __name__ == "__main__":
    main()
