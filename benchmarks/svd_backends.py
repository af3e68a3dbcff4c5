"""SVD back-ends for one LRPET projection pass over every conv of torchvision ResNet-50.

Compares ``project_low_rank_`` with ``svd_method`` "exact", "gram" and "randomized" against
the reference code's way (a Python loop doing a full ``torch.svd`` in float32 per layer,
truncating with energy transfer, rebuilding and copying back). BN rectification is off to
isolate the SVD. Prints, measured side by side in one run:

* wall time, best of ``--repeats``, as a ratio to the reference loop;
* the largest relative error ``||W - W*||_F / ||W*||_F`` over the 53 convs, where ``W*`` is
  the exact projection computed in float64.

Run:  python benchmarks/svd_backends.py [--rank-ratio 0.38] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from lrpet_lightning import project_low_rank_
from lrpet_lightning.core.linalg import project_matrix, rank_from_ratio, weight_to_matrix

METHODS = ("exact", "gram", "randomized")


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _rank(conv: nn.Conv2d, rank_ratio: float) -> int:
    M = weight_to_matrix(conv.weight)
    return rank_from_ratio(min(M.shape), rank_ratio)


@torch.no_grad()
def reference_projection_(model: nn.Module, rank_ratio: float) -> None:
    """The reference code's loop: full float32 SVD, energy transfer, rebuild, copy back."""
    for conv in _convs(model).values():
        W = conv.weight.data
        M = W.view(W.shape[0], -1)
        r = _rank(conv, rank_ratio)
        U, S, V = torch.svd(M)  # the reference code uses the (deprecated) torch.svd
        alpha = S.square().sum() / S[:r].square().sum()
        S = torch.cat([S[:r] * alpha.sqrt(), torch.zeros_like(S[r:])])
        conv.weight.data.copy_(((U * S) @ V.T).view_as(W))


@torch.no_grad()
def exact_float64(model: nn.Module, rank_ratio: float) -> dict[str, torch.Tensor]:
    """The ground truth: the projection of docs/method.md (no BN rectification) in float64."""
    out = {}
    for name, conv in _convs(model).items():
        M = weight_to_matrix(conv.weight).double()
        out[name] = project_matrix(M, _rank(conv, rank_ratio)).matrix.reshape(conv.weight.shape)
    return out


def _best_times(
    runs: dict[str, Callable[[nn.Module], None]], model: nn.Module, repeats: int
) -> tuple[dict[str, float], dict[str, nn.Module]]:
    """Best wall time of each run on fresh deep copies (copying is not timed), and the
    projected copy. Runs are interleaved round-robin so that a burst of load from other
    processes hits every method alike instead of one of them. On a GPU the clock stops
    after ``torch.cuda.synchronize()``."""
    cuda = next(model.parameters()).is_cuda
    best = {label: float("inf") for label in runs}
    projected: dict[str, nn.Module] = {}
    for _ in range(repeats):
        for label, run in runs.items():
            copy_ = copy.deepcopy(model)
            torch.manual_seed(0)  # randomized SVD draws its test matrix from the global RNG
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(copy_)
            if cuda:
                torch.cuda.synchronize()
            best[label] = min(best[label], time.perf_counter() - start)
            projected[label] = copy_
    return best, projected


def _max_rel_err(model: nn.Module, truth: dict[str, torch.Tensor]) -> float:
    errs = []
    for name, conv in _convs(model).items():
        ref = truth[name]
        ref = ref.to(conv.weight.device)
        errs.append(float((conv.weight.detach().double() - ref).norm() / ref.norm()))
    return max(errs)


@torch.no_grad()
def _max_energy_deficit(model: nn.Module, original: nn.Module, rank_ratio: float) -> float:
    """How much less of each original matrix's energy the method's rank-r subspace holds
    than the optimal (top-r singular) one, in fractions of the energy; max over layers.

    A small deficit with a large weight error means the method picked a different but
    nearly as good subspace: random init has no spectral gap, so the top-r subspace is
    ill-determined and an approximate SVD can land anywhere among near-optimal ones.
    """
    worst = 0.0
    originals = _convs(original)
    for name, conv in _convs(model).items():
        M = weight_to_matrix(originals[name].weight).double()
        r = _rank(conv, rank_ratio)
        s = torch.linalg.svdvals(M)
        Q = torch.linalg.svd(weight_to_matrix(conv.weight).double(), full_matrices=False)[0][:, :r]
        achieved = (Q.mT @ M).square().sum() / s.square().sum()
        optimal = s[:r].square().sum() / s.square().sum()
        worst = max(worst, float(optimal - achieved))
    return worst


def parse_args(
    doc: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """The ResNet-50 projection benchmarks' shared options (``extra`` adds a script's own);
    applies ``--threads``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rank-ratio", type=float, default=0.38)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="where the weights live: cpu, cuda")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = parse_args(__doc__)

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    n_convs = len(_convs(model))
    truth = exact_float64(model, args.rank_ratio)
    model.to(args.device)

    runs: dict[str, Callable[[nn.Module], None]] = {
        "reference loop (torch.svd f32)": lambda m: reference_projection_(m, args.rank_ratio),
    }
    for method in METHODS:
        runs[f'project_low_rank_ "{method}"'] = (
            lambda m, method=method: project_low_rank_(
                m, rank_ratio=args.rank_ratio, svd_method=method, bn_rectification=False))

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"torchvision resnet50 (random init), {n_convs} convs, rank_ratio {args.rank_ratio}, "
          f"bn_rectification off; torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), load average {load}, device {args.device}; best of {args.repeats}")
    print(f"{'method':32s} {'time / reference':>16s} {'max rel err vs exact f64':>25s} "
          f"{'max energy deficit':>19s}")
    seconds, projected = _best_times(runs, model, args.repeats)
    baseline = next(iter(seconds.values()))
    for label in runs:
        err = _max_rel_err(projected[label], truth)
        deficit = _max_energy_deficit(projected[label], model, args.rank_ratio)
        print(f"{label:32s} {seconds[label] / baseline:16.3f} {err:25.2e} {deficit:19.2e}")
    print(f"(reference loop: {baseline:.2f} s on this machine)")


if __name__ == "__main__":
    main()
