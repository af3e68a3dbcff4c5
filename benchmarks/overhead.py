"""Wall-time overhead of ``LowRankProjectionCallback`` on a small real fit.

Fits ResNet-20 on the bundled digits (``DigitsDataModule``) for ``--epochs`` epochs, with
``LowRankProjectionCallback(rank_ratio=0.4, report=False)`` projecting after every epoch
and without it; same seed, same data order. The two fits are interleaved ``--repeats``
times (a burst of load from other processes hits both alike) and the best ``trainer.fit``
wall time of each is kept. Prints the ratio with/without; the issue's target is <= 1.03.

With ``--device cuda`` it measures the ImageNet recipe instead: torchvision ResNet-50,
bf16-mixed, batch ``--batch-size`` of random 224x224 images made on the GPU (no data
loading, so the step is as short as it can be and the ratio errs high), ``--max-steps``
optimizer steps with a projection every ``--every-n-train-steps`` (final projection off, so
the count of projections is the schedule's); target <= 1.01.

Run:  python benchmarks/overhead.py [--epochs 5] [--repeats 2] [--image-size 32] [--threads N]
      python benchmarks/overhead.py --device cuda [--max-steps 500] [--every-n-train-steps 250]
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
TARGET_GPU = 1.01


class SyntheticImageNet(L.LightningModule):
    """ResNet-50 on random 224x224 images drawn on the module's device (one per step)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        import torchvision

        self.net = torchvision.models.resnet50()
        self.batch_size = batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(range(1_000_000), batch_size=1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = torch.randn(self.batch_size, 3, 224, 224, device=self.device)
        y = torch.randint(0, 1000, (self.batch_size,), device=self.device)
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def gpu_fit_seconds(with_callback: bool, max_steps: int, every: int, batch_size: int) -> float:
    """Wall time of one ``trainer.fit`` of the ImageNet recipe on one GPU."""
    L.seed_everything(0, verbose=False)
    module = SyntheticImageNet(batch_size).to(memory_format=torch.channels_last)
    callbacks = [LowRankProjectionCallback(
        rank_ratio=0.38, every_n_train_steps=every, final_projection=False,
        decompose_on_fit_end=False, report=False)] if with_callback else []
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="gpu", devices=1, precision="bf16-mixed",
        callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.fit(module)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def gpu_main(args: argparse.Namespace) -> None:
    best = {False: float("inf"), True: float("inf")}
    gpu_fit_seconds(False, 20, args.every_n_train_steps, args.batch_size)  # warm-up (cuDNN)
    for _ in range(args.repeats):
        for with_callback in (False, True):
            seconds = gpu_fit_seconds(with_callback, args.max_steps, args.every_n_train_steps,
                                      args.batch_size)
            best[with_callback] = min(best[with_callback], seconds)
    ratio = best[True] / best[False]
    print(f"resnet50, synthetic 224x224, batch {args.batch_size}, bf16-mixed, "
          f"{args.max_steps} steps, projection every {args.every_n_train_steps} steps "
          f"({args.max_steps // args.every_n_train_steps} projections) at rank_ratio 0.38; "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}; best of {args.repeats}, "
          f"interleaved")
    print(f"fit without callback: {best[False]:.2f} s   with callback: {best[True]:.2f} s")
    print(f"ratio with/without: {ratio:.4f}  (target <= {TARGET_GPU}: "
          f"{'MET' if ratio <= TARGET_GPU else 'NOT MET'})")


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
    parser.add_argument("--device", default="cpu", help="cpu (digits) or cuda (ResNet-50)")
    parser.add_argument("--max-steps", type=int, default=500, help="cuda only")
    parser.add_argument("--every-n-train-steps", type=int, default=250, help="cuda only")
    parser.add_argument("--batch-size", type=int, default=128, help="cuda only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
        return gpu_main(args)

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
