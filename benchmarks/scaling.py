"""How the cost of one projection pass grows with model size and with the rank ratio.

Times ``project_layers_`` (BN rectification off, random init) over every conv of
torchvision ResNet-18/34/50/101 at one rank ratio, and over ResNet-50 at several rank
ratios, for the default mode ("gram") and the fast mode ("gram32"); best of ``--repeats``.

What the cost should be, per layer with an ``rows x cols`` matrix, ``n = min(rows, cols)``
and kept rank ``r``: the Gram matrix ``rows * cols * n`` multiply-adds, its eigensolver
``~ n**3`` (a full eigendecomposition: LAPACK has no cheaper top-r path that torch exposes),
and the rebuild ``2 * rows * cols * r``. So the time should follow ``sum(rows * cols * n)``
across models (``n**3 <= rows * cols * n``) and grow only mildly with ``r``: the printed
"us per M" columns (microseconds per million of ``sum(rows * cols * n)``, or of the whole
modelled cost) should stay roughly flat down each table.

Run:  python benchmarks/scaling.py [--repeats 3] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torchvision
from torch import nn

from lrpet_lightning.core import LowRankConfig
from lrpet_lightning.core.transforms import project_layers_
from lrpet_lightning.core.walk import select_layers

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101")
RATIOS = (0.1, 0.2, 0.4, 0.6, 0.8)
MODES = ("gram", "gram32")


def _cost(model: nn.Module, config: LowRankConfig) -> tuple[int, float, float]:
    """Number of layers, sum(rows * cols * n) and the modelled multiply-adds
    sum(rows * cols * n + n**3 + 2 * rows * cols * r), both in millions."""
    gram = total = 0.0
    layers = select_layers(model, config)
    for layer in layers:
        rows, cols = layer.module.weight.reshape(layer.module.weight.shape[0], -1).shape
        n = min(rows, cols)
        gram += rows * cols * n
        total += rows * cols * n + n**3 + 2 * rows * cols * layer.rank
    return len(layers), gram / 1e6, total / 1e6


def _seconds(model: nn.Module, config: LowRankConfig, repeats: int) -> float:
    """Best time of one projection pass; the weights are restored between repeats."""
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cuda = next(model.parameters()).is_cuda
    best = float("inf")
    for _ in range(repeats):
        model.load_state_dict(original)
        layers = select_layers(model, config)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        project_layers_(layers, config)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank-ratio", type=float, default=0.38)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="where the weights live: cpu, cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"project_layers_, bn_rectification off, random init; torch {torch.__version__}, "
          f"{device}, {torch.get_num_threads()} thread(s), load average {load}; best of "
          f"{args.repeats}")

    def row(label: str, model: nn.Module, ratio: float) -> None:
        configs = {m: LowRankConfig(rank_ratio=ratio, bn_rectification=False, svd_method=m)
                   for m in MODES}
        n_layers, gram, total = _cost(model, configs["gram"])
        secs = {m: _seconds(model, c, args.repeats) for m, c in configs.items()}
        print(f"{label:10s} {n_layers:6d} {gram:9.0f} {total:9.0f} "
              + " ".join(f"{secs[m]:8.3f} {1e6 * secs[m] / gram:6.1f} {1e6 * secs[m] / total:6.1f}"
                         for m in MODES))

    header = (f"{'layers':>6s} {'M gram':>9s} {'M total':>9s} "
              + " ".join(f"{m + ' s':>8s} {'us/Mg':>6s} {'us/Mt':>6s}" for m in MODES))
    print(f"\nmodel size (rank_ratio {args.rank_ratio}); M gram = sum(rows*cols*n) / 1e6, "
          "M total = modelled multiply-adds / 1e6, us/M = microseconds per million")
    print(f"{'model':10s} {header}")
    for name in MODELS:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().to(args.device)
        row(name, model, args.rank_ratio)

    print("\nrank ratio (resnet50)")
    print(f"{'ratio':10s} {header}")
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(args.device)
    for ratio in RATIOS:
        row(f"{ratio:g}", model, ratio)


if __name__ == "__main__":
    main()
